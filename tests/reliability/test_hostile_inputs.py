"""Every case of the hostile-input corpus (tests/data/bad/build.py), built into a temporary directory:
one `error:` line with the expected message, exit 2, nothing written, no input touched, no code run.
The cases that must work (the Hugging Face cache's links, odd tensor names, zero-size and non-float
tensors, legacy and trainer pickles) merge, and what they promise is checked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers_ckpt import run_scf
from merge_helpers import leftovers

from scf.io import open_checkpoint

BUILD = Path(__file__).resolve().parents[1] / "data" / "bad" / "build.py"


def _load_build():  # noqa: ANN202 - the corpus module
    spec = importlib.util.spec_from_file_location("bad_corpus", BUILD)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


corpus = _load_build()


def _case_names() -> list[str]:
    """The case names, for parametrizing (building the corpus takes a fraction of a second)."""
    with tempfile.TemporaryDirectory() as scratch:
        return [case.name for case in corpus.build(Path(scratch) / "c")]


NAMES = _case_names()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bad")
    return root, {case.name: case for case in corpus.build(root)}


def digest_inputs(root: Path) -> dict[str, str]:
    """sha256 of every regular file of the corpus but the outputs (a FIFO is never read: it would block)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_fifo() and not str(p.relative_to(root)).startswith("out/")
    }


@pytest.mark.parametrize("name", NAMES)
def test_corpus_case(built: tuple[Path, dict], name: str) -> None:
    root, cases = built
    case = cases[name]
    args = [a.replace("{root}", str(root)) for a in case.args]
    out = Path(args[args.index("--out") + 1])
    before = digest_inputs(root)
    started = time.monotonic()
    code, _, err = run_scf(["merge", *args, "--quiet"])
    assert time.monotonic() - started < 60, "took too long (a hang or an expanded alias bomb?)"
    if case.expect:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        for fragment in case.expect:
            assert fragment.replace("{root}", str(root)) in lines[0], f"{fragment!r} not in {lines[0]!r}"
        assert not out.exists(), "a refused merge wrote its output"
    else:
        assert code == 0, err
        assert (out / "merge_report.json").is_file()
    assert leftovers(out.parent) == []
    assert digest_inputs(root) == before, "an input was modified"
    assert not any(root.glob("pwned*")) and not Path("pwned").exists(), "a pickle or a shell command ran"
    check = CHECKS.get(name)
    if check:
        check(root, out)


def _outputs(out: Path) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(out)
    return {name: checkpoint.load(name) for name in checkpoint.tensors}


def _non_float_from_base(root: Path, out: Path) -> None:
    merged = _outputs(out)
    assert torch.equal(merged["a.ids"], corpus.BASE["a.ids"]) and merged["a.ids"].dtype == torch.int8
    assert torch.equal(merged["a.mask"], corpus.BASE["a.mask"])
    assert torch.equal(merged["a.weight"], corpus.BASE["a.weight"] * 1.5)  # linear: the mean of 1x and 2x


def _odd_names(root: Path, out: Path) -> None:
    merged = _outputs(out)
    assert torch.equal(merged["../../evil"], torch.full((2,), 2.0)) and set(merged) >= {"a/b", "/abs/path"}
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "merge_config.yaml",
        "merge_report.json",
        "model.safetensors",
    ]
    assert not (out.parent.parent / "evil").exists() and not (out / "a").exists()


def _zero_size(root: Path, out: Path) -> None:
    assert _outputs(out)["empty.weight"].shape == (0, 4)


def _same_as_good(root: Path, out: Path) -> None:
    """A pickled or linked secondary gives the very bytes the plain safetensors one does."""
    reference = root / "out" / "reference"
    if not reference.exists():
        code, _, err = run_scf(
            [
                "merge",
                "--base",
                str(root / "good" / "base"),
                "--secondary",
                str(root / "good" / "sec"),
                "--method",
                "linear",
                "--out",
                str(reference),
                "--quiet",
            ]
        )
        assert code == 0, err
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


CHECKS = {
    "non_float_copied_from_base": _non_float_from_base,
    "tensor_names_with_separators": _odd_names,
    "zero_size_tensors": _zero_size,
    "hf_cache_symlinks": _same_as_good,
    "legacy_pickle": _same_as_good,
    "trainer_dir": _same_as_good,
}


def test_the_corpus_covers_the_issue_list() -> None:
    """Every kind of hostile input the issue names has at least one case."""
    for needed in (
        "truncated",
        "lies_about_offsets",
        "lies_about_dtype",
        "header_larger_than_file",
        "index_etc_passwd",
        "tensor_names_with_separators",
        "duplicate_across_shards",
        "zero_size_tensors",
        "non_float_copied_from_base",
        "nan",
        "inf",
        "config_unknown_key",
        "config_wrong_type",
        "config_alias_bomb",
        "config_shell_injection_0",
        "config_shard_size_zero",
        "malicious_pickle_with_allow_pickle",
        "pickle_refused_by_default",
    ):
        assert needed in NAMES
