"""Configs that would hang or pass bad settings: a YAML alias bomb is refused fast and in bounded memory
everywhere a YAML value is read (``--set``, ``--config``, the pipeline config), legitimate anchors keep
working, and the pipeline's ``merge:`` section is validated by the merge library's own schema when the
config loads. Every message is one line."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from helpers_ckpt import make_pair
from merge_helpers import refused

from scf.errors import ScfError, one_line, short_repr
from scf.spec import EngineSettings, MergeSpec
from scf.yamlsafe import load_yaml
from tasks.config import MergeSettings, load_config
from tasks.errors import PipelineError

# 9 levels of 9 aliases each: 9**9 = 387,420,489 strings from a value of under 300 bytes.
LEVELS = "abcdefghi"
BOMB = (
    "[&a [x,x,x,x,x,x,x,x,x], "
    + ", ".join(f"&{b} [{','.join(['*' + a] * 9)}]" for a, b in zip(LEVELS, LEVELS[1:], strict=False))
    + "]"
)
PIPELINE = {
    "name": "unit",
    "sources": {"base": "zoo:base", "secondary": "zoo:math"},
    "candidates": [{"method": "linear", "params": {"normalize": True}}],
    "gate": {"benchmarks": {"math.exact_match": {"tolerance": 0.05}}},
}


def bounded(fn):  # noqa: ANN001, ANN201 - any call
    """Run ``fn``; assert it took under 10 s and allocated under 20 MB on the Python heap."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        return fn()
    finally:
        elapsed, (_, peak) = time.monotonic() - started, tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < 10, f"took {elapsed:.1f} s"
        assert peak < 20 * 2**20, f"allocated {peak / 2**20:.0f} MB"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base, (sec,) = make_pair(tmp_path_factory.mktemp("bomb"))
    refused(
        ["--base", str(base), "--out", "x"], "base and secondary are required"
    )  # imports done before timing
    return base, sec


def test_the_bomb_is_small_and_expands_to_billions() -> None:
    assert len(f"alpha={BOMB}") < 300 and BOMB.count("*") == 72
    with pytest.raises(ScfError, match="expands to more than 387,420,488 values"):
        load_yaml(BOMB, "bomb", max_values=9**9 - 1)  # counted exactly (plus the lists), never expanded


def test_set_alias_bomb_is_refused_fast(pair: tuple[Path, Path], tmp_path: Path) -> None:
    args = [
        "--base",
        str(pair[0]),
        "--secondary",
        str(pair[1]),
        "--method",
        "scf_rkl",
        "--set",
        f"alpha={BOMB}",
    ]
    bounded(
        lambda: refused(
            [*args, "--out", str(tmp_path / "out")],
            "--set alpha: the YAML expands to more than 100,000 values through anchors and aliases",
        )
    )


def test_config_alias_bomb_is_refused_fast(pair: tuple[Path, Path], tmp_path: Path) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {pair[0]}\nsecondary: [{pair[1]}]\nmethod: scf_rkl\nparams:\n  alpha: {BOMB}\n")
    bounded(
        lambda: refused(
            ["--config", str(config), "--out", str(tmp_path / "out")],
            f"merge config {config}: the YAML expands to more than 100,000 values",
        )
    )


def test_pipeline_config_alias_bomb_in_candidate_params_is_refused_fast(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "name: unit\nsources: {base: 'zoo:base', secondary: 'zoo:math'}\n"
        f"candidates:\n  - {{method: linear, params: {{weight: {BOMB}}}}}\n"
        "gate: {benchmarks: {math.exact_match: {tolerance: 0.05}}}\n"
    )
    with pytest.raises(PipelineError, match=f"^{path}: the YAML expands to more than 100,000 values"):
        bounded(lambda: load_config(path))


def test_legitimate_anchors_still_work(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "name: unit\nsources: {base: 'zoo:base', secondary: 'zoo:math'}\n"
        "candidates:\n  - {method: linear, params: &shared {normalize: true, weight: 0.5}}\n"
        "  - {method: ties, params: *shared}\n"
        "gate: {benchmarks: {math.exact_match: {tolerance: 0.05}}}\n"
    )
    with pytest.raises(
        PipelineError, match="needs sources.reference"
    ):  # the anchor expanded into ties' params
        load_config(path)
    assert load_yaml("a: &x [1, 2]\nb: *x\n", "test") == {"a": [1, 2], "b": [1, 2]}


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(ScfError, match="recursive alias"):
        load_yaml("&a [1, *a]", "test")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"shard_size": "lots"}, "merge.shard_size: 'lots' is not a size; write e.g. 5GB"),
        ({"shard_size": 0}, "merge.shard_size: 0 must be at least 1 byte"),
        ({"shard_size": True}, "merge.shard_size: True is not a size"),
        ({"device": "tpu"}, "merge.device: Input should be 'auto', 'cpu' or 'cuda'"),
        ({"dtype": "float8"}, "merge.dtype: Input should be"),
        (
            {"shard_sise": "1GB"},
            "merge.shard_sise: unknown key; allowed: device, dtype, seed, shard_size, timeout_s",
        ),
    ],
)
def test_every_merge_setting_is_validated_when_the_config_loads(
    tmp_path: Path, setting: dict, message: str
) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({**PIPELINE, "merge": setting}))
    with pytest.raises(PipelineError) as info:
        load_config(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_merge_settings_are_the_merge_specs_own_fields() -> None:
    """One schema: the pipeline's merge section is scf's EngineSettings, as MergeSpec is."""
    assert issubclass(MergeSettings, EngineSettings) and issubclass(MergeSpec, EngineSettings)
    assert set(EngineSettings.model_fields) <= set(MergeSpec.model_fields)
    # Beyond the engine's settings, only MergeSpec's own fields (tokenizer_source, diagnostics,
    # diagnostic_layers), plus the pipeline's timeout.
    own = set(MergeSettings.model_fields) - set(EngineSettings.model_fields)
    assert own - set(MergeSpec.model_fields) == {"timeout_s"}
    assert own & set(MergeSpec.model_fields) == {"tokenizer_source", "diagnostics", "diagnostic_layers"}


def test_pipeline_config_problems_are_one_line_with_their_keys(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({**PIPELINE, "merge": {"shard_size": "lots", "seed": "x"}}))
    with pytest.raises(PipelineError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: invalid config: ")
    assert (
        "merge.seed: Input should be a valid integer" in message and "; merge.shard_size: 'lots'" in message
    )


def test_error_messages_are_one_bounded_line() -> None:
    assert str(ScfError("first\n  second\r\nthird")) == "first; second; third"
    assert len(str(ScfError("x" * 10**6))) <= 2000
    assert one_line("\x1b[1mbold\x1b[0m") == "bold"
    shared = ["x"] * 9
    assert (
        short_repr([shared] * 9) == "<list of 9 items>" and short_repr([shared]) == "<list of 1 nested items>"
    )
    assert short_repr("y" * 500).endswith("...") and len(short_repr("y" * 500)) == 120
