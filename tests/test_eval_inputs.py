"""`scf eval` on hostile or broken model directories, and code that ships with a model.

Each bad directory gets one `error:` line and exit code 2: a file given as the model, a tokenizer
that cannot be loaded or has no vocabulary, pickled weights without `--allow-pickle` (a pickle that
would run code never runs). `trust_remote_code` is off unless the config or flag turns it on, and
turning it on is logged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evals.spec import EvalSpec, GenParams
from evals.suites import evaluate
from evals.zoo import save_untrained
from flows.cli import main

REPO = Path(__file__).resolve().parents[1]
XSTEST = Path(__file__).parent / "data" / "safety" / "xstest.csv"
QUICK = ["--suite", "safety", "--safety-data", str(XSTEST), "--max-new-tokens", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    return save_untrained(tmp_path_factory.mktemp("models") / "untrained")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def _copy(untrained: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(untrained, tmp_path / name))


class _Marker:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_file_is_not_a_model_directory(untrained, capsys):
    weights = untrained / "model.safetensors"
    assert main(["eval", str(weights)]) == 2
    assert f"{weights} is a file, not a model directory" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json{", "its tokenizer cannot be loaded (JSONDecodeError: Expecting value"),
        ("[1, 2]", "its tokenizer cannot be loaded (AttributeError:"),
        (json.dumps({"tokenizer_class": "LlamaTokenizer"}), "turns text into no tokens; it is not a usable"),
    ],
)
def test_a_tokenizer_config_that_is_not_a_tokenizer(untrained, tmp_path, capsys, content, expected):
    model = _copy(untrained, tmp_path, "bad_tokenizer")
    (model / "tokenizer.json").unlink()  # only tokenizer_config.json is left to describe a tokenizer
    (model / "tokenizer_config.json").write_text(content)
    out = tmp_path / "report.json"
    assert main(["eval", str(model), *QUICK, "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert f"model directory {model}: " in err and expected in err
    assert not out.exists()


def test_pickled_weights_are_refused_unless_allowed_and_never_unpickled(untrained, tmp_path, capsys):
    model = _copy(untrained, tmp_path, "pickled")
    state = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    assert main(["eval", str(model), *QUICK]) == 2
    err = _one_error_line(capsys)
    assert f"model directory {model} has only pickled weights (pytorch_model.bin), which can run code" in err
    assert "--allow-pickle" in err

    assert main(["eval", str(model), *QUICK, "--allow-pickle"]) == 0  # opted in: it loads
    assert "over_refusal_rate" in capsys.readouterr().out

    marker = tmp_path / "pickle-ran"
    torch.save({"weights": _Marker(marker)}, model / "pytorch_model.bin")
    assert main(["eval", str(model), *QUICK]) == 2
    assert not marker.exists()  # refused before anything was unpickled


def test_safetensors_are_read_and_a_pickle_next_to_them_is_never_loaded(untrained, tmp_path, capsys):
    model = _copy(untrained, tmp_path, "both")
    marker = tmp_path / "pickle-ran"
    torch.save({"weights": _Marker(marker)}, model / "pytorch_model.bin")
    assert main(["eval", str(model), *QUICK]) == 0
    assert not marker.exists()


def _with_remote_code(untrained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A model whose config maps AutoModelForCausalLM to its own code, which leaves a marker file."""
    model = _copy(untrained, tmp_path, "remote")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomLlama"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(
        "import os\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "open(os.environ['SCF_TEST_MARKER'], 'w').write('remote code ran')\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
        "class CustomLlama(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    return model, tmp_path / "remote-code-ran"


def test_remote_code_is_off_by_default_everywhere(untrained, tmp_path, monkeypatch):
    from lm_eval.models import huggingface
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, marker = _with_remote_code(untrained, tmp_path)
    monkeypatch.setenv("SCF_TEST_MARKER", str(marker))
    seen: list[tuple[str, object]] = []

    def spy(owner, name: str):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.append((name, kwargs.get("trust_remote_code", "not passed")))
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy(AutoTokenizer, "from_pretrained"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy(AutoModelForCausalLM, "from_pretrained"))
    monkeypatch.setattr(huggingface.HFLM, "__init__", spy(huggingface.HFLM, "__init__"))

    report = evaluate(model, EvalSpec(suite="toy", limit=1, device="cpu", gen=GenParams(max_new_tokens=2)))
    assert report.spec.trust_remote_code is False
    assert {name for name, _ in seen} == {"from_pretrained", "__init__"}  # tokenizer, model, HFLM
    assert all(value is False for _, value in seen), seen
    assert not marker.exists()  # the model's own code never ran


def test_remote_code_runs_only_when_turned_on_and_is_logged(untrained, tmp_path):
    model, marker = _with_remote_code(untrained, tmp_path)
    env = os.environ | {
        "PYTHONPATH": str(REPO),
        "SCF_TEST_MARKER": str(marker),
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),  # transformers copies remote code there
    }
    command = [sys.executable, "-m", "evals", "eval", str(model), *QUICK, "--no-progress"]
    result = subprocess.run([*command, "--trust-remote-code"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "remote code ran"
    warnings = [line for line in result.stderr.splitlines() if "trust_remote_code is on" in line]
    assert warnings and str(model) in warnings[0]
