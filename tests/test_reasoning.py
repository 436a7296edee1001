"""lm-eval on the toy YAML tasks, offline, with the same model and decoding as our backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers_eval import GEN, run_local_tasks  # tests/ is on sys.path

from evals import toytasks
from evals.backends import load_backend
from evals.errors import EvalError
from evals.reasoning import prepare_toy_tasks
from evals.zoo import save_untrained


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return load_backend("transformers", save_untrained(tmp_path_factory.mktemp("models") / "m"), device="cpu")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return prepare_toy_tasks(tmp_path_factory.mktemp("tasks"), seed=0)


@pytest.fixture(scope="module")
def run(backend, task_dir):
    return run_local_tasks(backend, ["toy_math", "toy_strings"], task_dir, limit=3)


def test_toy_task_files_pin_absolute_data_paths(task_dir):
    config = yaml.safe_load((task_dir / "toy_math.yaml").read_text())
    data = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data == task_dir / "math.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    expected = toytasks.test_set("math", seed=0)
    assert [(r["prompt"], r["target"]) for r in rows] == [(e.prompt, e.target) for e in expected]
    assert config["metadata"]["version"] == 1.0
    assert (task_dir / "_toy_template.yaml").is_file()


def test_cached_toy_tasks_are_published_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SCF_CACHE", str(tmp_path))
    first = prepare_toy_tasks(seed=0)
    assert first.parent == tmp_path / "lm_tasks" and first.name.startswith("toy-seed0-")
    assert prepare_toy_tasks(seed=0) == first
    assert prepare_toy_tasks(seed=1) != first  # other test sets, other directory
    assert sorted(p.name for p in (tmp_path / "lm_tasks").iterdir()) == sorted(
        [first.name, prepare_toy_tasks(seed=1).name]
    )  # no temporary directories left behind
    config = yaml.safe_load((first / "toy_strings.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str(first / "strings.jsonl")


def test_scores_carry_counts_version_and_stderr(run):
    by_name = {s.benchmark: s for s in run.scores}
    assert set(by_name) == {"toy_math", "toy_strings"}
    math = by_name["toy_math"]
    assert (math.metric, math.n, math.n_total, math.version, math.higher_is_better) == (
        "exact_match",
        3,
        toytasks.TEST_SIZE["math"],
        "1.0",
        True,
    )
    assert by_name["toy_strings"].n_total == toytasks.TEST_SIZE["strings"]
    assert math.stderr is not None
    assert run.config["apply_chat_template"] is True
    assert run.config["gen_kwargs"]["max_gen_toks"] == toytasks.MAX_NEW_TOKENS


def test_samples_come_back_scored_for_repetition(run, backend):
    assert len(run.samples) == 6
    math_rows = toytasks.test_set("math", seed=0)[:3]
    math_samples = [s for s in run.samples if s.benchmark == "toy_math"]
    assert [s.prompt for s in math_samples] == [toytasks.render_prompt(r.prompt) for r in math_rows]
    for sample in run.samples:
        assert sample.token_ids == backend.tokenizer(sample.text)["input_ids"]
        assert sample.truncated == (len(sample.token_ids) >= GEN.max_new_tokens)
        # lm-eval's exact match agrees with the toy tasks' own answer rule.
        assert sample.correct == (toytasks.extract_answer(sample.text) == sample.target)
    score = {s.benchmark: s.value for s in run.scores}["toy_math"]
    assert score == sum(s.correct for s in math_samples) / 3


def test_lm_eval_generates_what_our_backend_generates(run, backend):
    """One model, one decoding: lm-eval's greedy text is our backend's, cut at the task's stop "\\n"."""
    prompts = [r.prompt for r in toytasks.test_set("math", seed=0)[:3]]
    ours = backend.generate(prompts, GEN)
    lm_eval_texts = [s.text for s in run.samples if s.benchmark == "toy_math"]
    assert lm_eval_texts == [g.text.split("\n", 1)[0] for g in ours]


def test_unknown_task_is_named(backend, task_dir):
    with pytest.raises(EvalError, match="unknown lm-eval task 'toy_mth'; did you mean: toy_math"):
        run_local_tasks(backend, ["toy_mth"], task_dir, limit=1)


def test_dataset_missing_offline_is_a_clear_error(backend, tmp_path):
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\n"
        "dataset_path: scf-pipeline-tests/not-in-any-cache\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_target: "{{a}}"\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    with pytest.raises(EvalError, match="could not load the data of hub_task.*local Hugging Face cache"):
        run_local_tasks(backend, ["hub_task"], tmp_path, limit=1)
