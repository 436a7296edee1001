"""Model sources: local dirs and files, hub ids resolved offline from a pre-populated cache, fingerprints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_ckpt import finetune, llama_config, llama_state, save_checkpoint

from scf.errors import ScfError
from scf.io import open_checkpoint, read_header
from scf.sources import resolve_source

SHA_MAIN = "1" * 40
SHA_OLD = "2" * 40


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    config = llama_config()
    state = llama_state(config, seed=0)
    return {
        "single": save_checkpoint(root / "single", state, config),
        "sharded": save_checkpoint(root / "sharded", state, config, shard_size=20_000),
        "tuned": save_checkpoint(root / "tuned", finetune(state, seed=5), config),
    }


def test_local_dir_single_sharded_and_file(models: dict[str, Path]) -> None:
    single = resolve_source(str(models["single"]))
    assert single.path == models["single"].absolute() and single.revision is None
    sharded = resolve_source(str(models["sharded"]))
    assert len(open_checkpoint(sharded.path).files) > 2
    lone = resolve_source(str(models["single"] / "model.safetensors"))
    assert lone.path.is_file()
    names = set(open_checkpoint(single.path).tensors)
    assert set(open_checkpoint(sharded.path).tensors) == names == set(open_checkpoint(lone.path).tensors)


def test_fingerprint_is_content_based(models: dict[str, Path], tmp_path: Path) -> None:
    first = resolve_source(str(models["single"])).fingerprint
    copy = shutil.copytree(models["single"], tmp_path / "copy")
    assert resolve_source(str(copy)).fingerprint == first  # same bytes elsewhere: same identity
    # A fine-tune has an identical header (names, shapes, offsets) but different values.
    assert resolve_source(str(models["tuned"])).fingerprint != first
    assert len(first) == 64


def _hub_cache(root: Path, model: Path) -> Path:
    """A Hugging Face cache holding org/tiny at two commits, `main` -> SHA_MAIN and tag `v1` -> SHA_OLD."""
    repo = root / "models--org--tiny"
    for sha in (SHA_MAIN, SHA_OLD):
        snapshot = repo / "snapshots" / sha
        shutil.copytree(model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA_MAIN)
    (repo / "refs" / "v1").write_text(SHA_OLD)
    return root


@pytest.fixture
def offline_hub(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = _hub_cache(tmp_path / "hub", models["single"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # "org/tiny" must not exist as a relative local path
    return cache


def test_hub_id_resolves_offline_to_pinned_commit(offline_hub: Path) -> None:
    source = resolve_source("org/tiny")
    assert source.revision == SHA_MAIN and source.fingerprint == SHA_MAIN
    assert source.path == offline_hub / "models--org--tiny" / "snapshots" / SHA_MAIN
    assert source.pinned_ref() == f"org/tiny@{SHA_MAIN}"


@pytest.mark.parametrize("revision", ["v1", SHA_OLD])
def test_hub_revision_by_tag_or_commit(offline_hub: Path, revision: str) -> None:
    source = resolve_source(f"org/tiny@{revision}")
    assert source.revision == SHA_OLD
    assert source.path.name == SHA_OLD


@pytest.mark.parametrize("ref", ["org/missing", "org/tiny@v9"])
def test_unknown_hub_id_or_revision(offline_hub: Path, ref: str) -> None:
    with pytest.raises(ScfError, match=r"hub repo 'org/(missing|tiny)'.*not found in the local Hugging Face"):
        resolve_source(ref)


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(ScfError, match="no such file or directory") as err:
        resolve_source(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(err.value)


def test_pickle_refused_unless_allowed(models: dict[str, Path], tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in llama_state(llama_config(), seed=0).items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ScfError, match=r"only pickled \.bin weights \(pytorch_model\.bin\).*--allow-pickle"):
        resolve_source(str(tmp_path))
    checkpoint = open_checkpoint(resolve_source(str(tmp_path), allow_pickle=True).path, allow_pickle=True)
    assert torch.equal(checkpoint.load("model.norm.weight"), state["model.norm.weight"])


def test_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ScfError, match=f"{tmp_path}: no model weights found"):
        resolve_source(str(tmp_path))


def test_truncated_and_corrupted_files(models: dict[str, Path], tmp_path: Path) -> None:
    data = (models["single"] / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-100])
    with pytest.raises(ScfError, match=r"truncated\.safetensors: truncated safetensors: tensor '.+' ends at"):
        read_header(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(ScfError, match=r"garbage\.safetensors: corrupted safetensors header"):
        resolve_source(str(garbage))
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(ScfError, match="not a safetensors file"):
        resolve_source(str(tiny))


def test_index_naming_missing_shard(models: dict[str, Path], tmp_path: Path) -> None:
    broken = shutil.copytree(models["sharded"], tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (broken / victim).unlink()
    with pytest.raises(ScfError, match=f"names shard '{victim}', which does not exist"):
        resolve_source(str(broken))
