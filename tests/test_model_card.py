"""The merge output's README.md model card: Hub front matter, the license rule, the body's sections."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers_ckpt import make_pair

from scf.card import front_matter, model_card, shared_license
from scf.merge import merge
from scf.spec import MergeSpec


def _card(path: Path, license_id: str | None) -> None:
    head = f"license: {license_id}\n" if license_id else "tags: [x]\n"
    path.write_text(f"---\n{head}language: en\n---\n\n# A model\n")


def _split(card: str) -> tuple[dict, str]:
    """The parsed front matter and the body of a card."""
    assert card.startswith("---\n")
    head, _, body = card[4:].partition("\n---\n")
    return yaml.safe_load(head), body


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("card")
    base, (sec, ref) = make_pair(root, n_secondaries=2)
    for model in (base, sec, ref):
        _card(model / "README.md", "apache-2.0")
    return base, sec, ref


def test_card_of_a_merge(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, sec, ref = pair
    spec = MergeSpec(base=str(base), secondary=[str(sec)], reference=str(ref), method="ties",
                     params={"density": 0.5, "weight": [0.7, 0.3]}, diagnostics=True)
    out = tmp_path / "merged-ties"
    report = merge(spec, out, progress=False)
    for name in ("README.md", "merge_report.json", "merge_config.yaml", "config.json",
                 "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    head, body = _split((out / "README.md").read_text())
    assert head == {"base_model": [str(base), str(sec), str(ref)], "library_name": "transformers",
                    "tags": ["merge", "scf-pipeline", "ties"], "license": "apache-2.0"}
    assert body.startswith("\n# merged-ties\n\nA merge of 3 models made with scf-pipeline ")
    assert "Paper: [TIES-Merging (Yadav et al., 2023)](https://arxiv.org/abs/2306.01708)\n" in body
    assert "```yaml\nmethod: ties\nparams:\n" in body and "  density: 0.5\n" in body
    inputs = report["inputs"]
    fingerprints = [inputs["base"]["fingerprint"], inputs["secondaries"][0]["fingerprint"],
                    inputs["reference"]["fingerprint"]]
    assert f"| base | `{base}` | (local) | `{fingerprints[0][:16]}` |\n" in body
    assert f"| secondary[0] | `{sec}` | (local) | `{fingerprints[1][:16]}` |\n" in body
    assert f"| reference | `{ref}` | (local) | `{fingerprints[2][:16]}` |\n" in body
    shares = report["diagnostics"]["fraction_from"]
    assert f"| base | {shares['base']:.2%} |\n| secondary[0] | {shares['secondary_0']:.2%} |\n" in body
    assert "| 0 | " in body and "| other | " in body  # per-layer sparsity from the diagnostics
    assert body.endswith("| config.json | base |\n| tokenizer | base |\n| generation_config.json | base |\n"
                         "| chat template | none |\n")
    assert report["files_from"] == {"config": "base", "tokenizer": "base", "generation_config": "base",
                                    "chat_template": None}


def test_license_rule(tmp_path: Path) -> None:
    dirs = []
    for i, license_id in enumerate(["mit", "mit", "apache-2.0", None]):
        (tmp_path / str(i)).mkdir()
        _card(tmp_path / str(i) / "README.md", license_id)
        dirs.append(tmp_path / str(i))
    (tmp_path / "none").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert shared_license(dirs[:2]) == "mit"
    assert shared_license(dirs[:3]) is None  # two licenses
    assert shared_license([dirs[0], dirs[3]]) is None  # one card declares none
    assert shared_license([dirs[0], tmp_path / "none"]) is None  # one input has no card
    assert shared_license([dirs[0], None]) is None  # a lone .safetensors file
    assert shared_license([dirs[0], tmp_path / "bad"]) is None  # malformed front matter never fails a merge
    assert front_matter(tmp_path / "bad" / "README.md") is None
    assert front_matter(dirs[0] / "README.md") == {"license": "mit", "language": "en"}


def test_hub_inputs_keep_their_ids_and_revisions() -> None:
    """Hub ids go to base_model as ids (the Hub validates them); revisions go to the inputs table."""
    entry = {"ref": "org/base@main", "revision": "a" * 40, "fingerprint": "a" * 40}
    report = {"method": "linear", "params": {"weight": 1.0, "normalize": True}, "dtype": "bfloat16",
              "seed": 0, "scf_version": "0.1.0", "inputs": {"base": entry, "reference": None, "secondaries": [
                  {"ref": "org/math", "revision": "b" * 40, "fingerprint": "b" * 40},
                  {"ref": "./local", "revision": None, "fingerprint": "c" * 64}]},
              "totals": {"fraction_from": {"base": 0.25, "secondary_0": 0.5, "secondary_1": 0.0,
                                           "neither": 0.25}}}
    head, body = _split(model_card(report, "out", "mit"))
    assert head == {"base_model": ["org/base", "org/math", "./local"], "library_name": "transformers",
                    "tags": ["merge", "scf-pipeline", "linear"], "license": "mit"}
    assert f"| base | `org/base` | `{'a' * 40}` | `{'a' * 16}` |\n" in body
    assert f"| secondary[1] | `./local` | (local) | `{'c' * 16}` |\n" in body
    assert "| secondary[0] | 50.00% |\n| secondary[1] | 0.00% |\n| neither | 25.00% |\n" in body
    assert "Paper: [Model soups (Wortsman et al., 2022)](https://arxiv.org/abs/2203.05482)\n" in body
