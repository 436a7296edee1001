"""`scf merge` (flags, YAML config, overrides) and `scf methods`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_ckpt import make_pair, run_scf

from scf.cli import parse_set
from scf.merge import merge
from scf.methods.registry import METHODS
from scf.spec import MergeSpec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base, secs = make_pair(tmp_path_factory.mktemp("cli"))
    return base, secs[0]


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def test_merge_flags_equal_the_library_call(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, sec = pair
    code, out, _ = run_scf(["merge", "--base", str(base), "--secondary", str(sec), "--method", "linear",
                            "--set", "weight=[0.25, 0.75]", "--seed", "4", "--out", str(tmp_path / "cli"),
                            "--quiet"])
    assert code == 0
    assert out.startswith("merged 21 tensors") and str(tmp_path / "cli") in out
    spec = MergeSpec(base=str(base), secondary=[str(sec)], method="linear", params={"weight": [0.25, 0.75]},
                     seed=4)
    merge(spec, tmp_path / "api", progress=False)
    assert shards(tmp_path / "cli") == shards(tmp_path / "api")
    report = json.loads((tmp_path / "cli" / "merge_report.json").read_text())
    assert report["params"]["weight"] == [0.25, 0.75] and report["seed"] == 4


def test_config_file_with_flag_overrides(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, sec = pair
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {base}\nsecondary:\n  - {sec}\nmethod: linear\nparams:\n  weight: [1.0, 0.0]\n"
                      f"  normalize: true\ndtype: float32\n")
    code, _, _ = run_scf(["merge", "--config", str(config), "--out", str(tmp_path / "yaml"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "yaml" / "merge_report.json").read_text())
    assert report["totals"]["fraction_from"]["base"] == 1.0  # weight [1, 0]: the base, unchanged
    code, _, _ = run_scf(["merge", "--config", str(config), "--set", "weight=[0, 1]", "--dtype", "bfloat16",
                          "--out", str(tmp_path / "override"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "override" / "merge_report.json").read_text())
    assert report["params"] == {"weight": [0, 1], "normalize": True}  # --set replaced one key, kept the other
    assert report["dtype"] == "bfloat16"
    # every value is the secondary's rounded to bfloat16 (a few also equal the rounded base: counted as base)
    shares = report["totals"]["fraction_from"]
    assert shares["neither"] == 0.0 and shares["secondary_0"] > 0.95


def test_set_values_are_yaml() -> None:
    assert parse_set(["alpha=1.5", "weight=[0.7, 0.3]", "normalize=false", "name=abc", "k=3"]) == {
        "alpha": 1.5, "weight": [0.7, 0.3], "normalize": False, "name": "abc", "k": 3}


def test_methods_lists_every_method_with_params() -> None:
    code, out, _ = run_scf(["methods"])
    assert code == 0
    blocks = {block.split(" (", 1)[0]: block for block in out.strip().split("\n\n")}
    assert set(blocks) == set(METHODS)
    for name, spec in METHODS.items():
        assert spec.reference_url in blocks[name]
        for key, field in spec.params.model_fields.items():
            shown = field.alias or key  # the key configs write
            line = next(line for line in blocks[name].splitlines() if line.startswith(f"    {shown} "))
            assert line.split(": ", 1)[1] == field.description  # every parameter has its help
    assert "lambda_" not in out and "    lambda = 1.0: scale of the merged task vector" in blocks["ties"]
    assert "    t required: interpolation factor" in blocks["slerp"]  # slerp's t has no default
    assert blocks["slerp"].startswith("slerp (base + 1 secondary)\n")
    assert blocks["ties"].startswith("ties (base + secondaries, needs --reference)\n")
    code, out, _ = run_scf(["methods", "--json"])
    listed = {m["name"]: m for m in json.loads(out)}
    assert set(listed) == set(METHODS)
    linear = {p["name"]: p for p in listed["linear"]["params"]}
    assert linear["weight"]["default"] == 1.0 and linear["weight"]["per_model"] is True
    assert linear["normalize"]["default"] is True and linear["normalize"]["required"] is False
    ties = {p["name"]: p for p in listed["ties"]["params"]}
    assert "lambda" in ties and "lambda_" not in ties
    assert listed["slerp"]["params"] == [{
        "name": "t", "default": None, "required": True, "bounds": "", "per_model": False,
        "help": METHODS["slerp"].params.model_fields["t"].description}]


def test_methods_into_a_closed_pipe_exits_quietly() -> None:
    # `scf methods | head -1`: the reader is gone before we finish writing. A pipe whose read end
    # is already closed makes that deterministic: no traceback, the status of a SIGPIPE'd command.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "flows.cli", "methods"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, cwd=REPO)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")


HEAVY = ("prefect", "mlflow", "duckdb", "torch")
IMPORTS_PROBE = """
import json, sys
from flows.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize(("argv", "allowed"), [
    (["--help"], set()), (["methods"], set()), (["merge", "--help"], set()), (["nightly", "--help"], set()),
])
def test_the_cli_imports_only_what_the_subcommand_runs(argv: list[str], allowed: set[str]) -> None:
    # `scf --help` and `scf methods` import neither torch nor the orchestration stack; `scf merge`
    # would import torch in its handler, but never Prefect, MLflow or DuckDB (checked below).
    probe = IMPORTS_PROBE.format(heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=REPO)
    imported = set(json.loads(result.stderr.strip().splitlines()[-1]))
    assert imported <= allowed, f"scf {' '.join(argv)} imported {sorted(imported)}"


def test_a_merge_imports_torch_but_not_the_orchestration_stack(pair: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    base, sec = pair
    argv = ["merge", "--base", str(base), "--secondary", str(sec), "--method", "linear", "--quiet",
            "--out", str(tmp_path / "out")]
    probe = IMPORTS_PROBE.format(heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=REPO)
    assert (tmp_path / "out" / "merge_report.json").exists(), result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == ["torch"]


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("evals.cli", "flows.pipeline_cli")),
                    reason="the scf entry point composes evals and pipeline commands, not all written yet")
def test_entry_point_exit_code_2(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = pair
    result = subprocess.run([sys.executable, "-m", "flows.cli", "merge", "--base", str(base), "--secondary",
                             str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.startswith("error: model source") and "missing" in result.stderr
    assert not (tmp_path / "out").exists()
