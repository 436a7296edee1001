"""Per-item results: stable item ids, per-item scores that average to the benchmark scores, item slices.

Real lm-eval runs on the tiny zoo's math specialist (greedy, CPU), on the toy tasks plus test-only
variants of them: one with two answer filters, one group of two tasks, one multiple-choice task.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from helpers_eval import run_local_tasks  # tests/ is on sys.path

from evals import toytasks
from evals.backends import load_backend
from evals.errors import EvalError
from evals.reasoning import prepare_toy_tasks
from evals.spec import EvalReport, EvalSpec, ItemSlice, item_id, item_positions
from evals.suites import evaluate, toy_safety_prompts
from flows.cli import main

SAFETY = Path(__file__).parent / "data" / "safety"
ITEM_ID = re.compile(r"^(?:[a-z_]+/)?\d+-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def model(tiny_zoo) -> Path:
    return tiny_zoo / "math"


@pytest.fixture(scope="module")
def backend(model):
    return load_backend("transformers", model, device="cpu")


def _regex(pattern: str) -> dict:
    return {"function": "regex", "regex_pattern": pattern}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The toy tasks plus: toy_filters (two filters), toy_group (toy_math + toy_strings), toy_choice."""
    out = prepare_toy_tasks(tmp_path_factory.mktemp("tasks"), seed=0)
    data = {"test": str(out / "math.jsonl")}
    extra = {
        "toy_filters": {
            "task": "toy_filters",
            "include": "_toy_template.yaml",
            "dataset_kwargs": {"data_files": data},
            "filter_list": [
                {"name": "strict-match", "filter": [_regex(r"^(\d+)$"), {"function": "take_first"}]},
                {"name": "first-digit", "filter": [_regex(r"(\d)"), {"function": "take_first"}]},
            ],
            "metadata": {"version": 1.0},
        },
        "toy_group": {
            "group": "toy_group",
            "task": ["toy_math", "toy_strings"],
            "aggregate_metric_list": [
                {"metric": "exact_match", "aggregation": "mean", "weight_by_size": True}
            ],
            "metadata": {"version": 1.0},
        },
        "toy_choice": {
            "task": "toy_choice",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": data},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "{{prompt}}=",
            "doc_to_choice": "{{[target, '1' + target]}}",
            "doc_to_target": 0,
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
            "metadata": {"version": 1.0},
        },
    }
    for name, config in extra.items():
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def run(backend, task_dir):
    return run_local_tasks(backend, ["toy_filters", "toy_group", "toy_choice"], task_dir, limit=6)


def test_item_id_is_the_position_and_a_hash_of_the_content():
    doc = {"prompt": "37+45", "target": "82"}
    assert re.fullmatch(r"17-[0-9a-f]{12}", item_id(17, doc))
    assert item_id(17, doc) == item_id(17, {"target": "82", "prompt": "37+45"})  # canonical JSON
    assert item_id(17, doc) != item_id(17, {**doc, "prompt": "37+46"})  # the text changed: a new id
    assert item_id(17, doc) != item_id(18, doc)
    assert item_id(3, doc, task="toy_math") == f"toy_math/{item_id(3, doc)}"


def test_slice_positions():
    assert item_positions(100, None, None) == range(100)
    assert item_positions(100, 8, None) == range(8)
    assert item_positions(100, 8, ItemSlice(start=2, stop=5)) == range(2, 5)
    assert item_positions(100, 8, ItemSlice(start=6, stop=50)) == range(6, 8)  # clipped to the limit
    assert item_positions(3, None, ItemSlice(start=5)) == range(3, 3)
    # Shares of each benchmark's own size: consecutive stages tile it, even through float error.
    for n in (1, 3, 7, 24, 100, 1319):
        stages = [ItemSlice.shares(a, b) for a, b in [(0, 0.25), (0.25, 0.29), (0.29, 0.5), (0.5, 1.0)]]
        positions = [i for stage in stages for i in item_positions(n, None, stage)]
        assert positions == list(range(n)), n
    assert item_positions(100, None, ItemSlice.shares(0.25, 0.29)) == range(25, 29)


def test_bad_slices_are_named():
    with pytest.raises(ValueError, match=r"stop \(2\) must be above start \(5\)"):
        ItemSlice(start=5, stop=2)
    with pytest.raises(ValueError, match=r"shares must lie in \[0, 1\]"):
        ItemSlice.shares(0.5, 1.5)
    with pytest.raises(ValueError, match="item positions must be whole numbers"):
        ItemSlice(start=0.25, stop=0.5)
    with pytest.raises(ValueError, match=r"items.start \(8\) must be below limit \(8\)"):
        EvalSpec(suite="toy", limit=8, items=ItemSlice(start=8))


def test_lm_eval_items_are_ids_of_their_documents(run):
    # The id hashes the document as the task reads it (its JSONL row), not the rendered prompt.
    docs = [item_id(i, toytasks.example_record(d)) for i, d in enumerate(toytasks.test_set("math", seed=0))]
    assert [s.item_id for s in run.samples if s.benchmark == "toy_choice"] == docs[:6]
    group = [s.item_id for s in run.samples if s.benchmark == "toy_group"]
    assert group[:6] == [f"toy_math/{doc}" for doc in docs[:6]]
    assert [i.split("/")[0] for i in group] == ["toy_math"] * 6 + ["toy_strings"] * 6
    assert all(ITEM_ID.match(s.item_id) for s in run.samples)
    assert len({(s.benchmark, s.item_id) for s in run.samples}) == len(run.samples) == 24


def test_item_ids_do_not_depend_on_the_chat_template(backend, task_dir, run):
    plain = run_local_tasks(backend, ["toy_filters"], task_dir, limit=6, chat_template=False)
    templated = [s for s in run.samples if s.benchmark == "toy_filters"]
    assert [s.item_id for s in plain.samples] == [s.item_id for s in templated]
    assert plain.samples[0].prompt != templated[0].prompt  # the model saw different text


def test_every_filter_s_metric_is_a_per_item_score(run):
    filtered = [s for s in run.samples if s.benchmark == "toy_filters"]
    assert len(filtered) == 6  # one sample per document, not one per filter
    assert {name for s in filtered for name in s.scores} == {
        "exact_match_strict-match",
        "exact_match_first-digit",
    }
    # The filters score the same generation differently: "102" is not its first digit.
    assert {s.scores["exact_match_strict-match"] for s in filtered} == {1.0}
    assert {s.scores["exact_match_first-digit"] for s in filtered} == {0.0}


def test_per_item_scores_average_to_the_benchmark_scores(run):
    names = {(s.benchmark, s.metric) for s in run.scores}
    assert names == {
        ("toy_filters", "exact_match_strict-match"),
        ("toy_filters", "exact_match_first-digit"),
        ("toy_group", "exact_match"),
        ("toy_choice", "acc"),
        ("toy_choice", "acc_norm"),
    }
    for score in run.scores:  # every metric here is mean-aggregated (the group weights by size)
        values = [s.scores[score.metric] for s in run.samples if s.benchmark == score.benchmark]
        assert len(values) == score.n
        assert sum(values) / len(values) == pytest.approx(score.value), (score.benchmark, score.metric)
    assert {s.scores["exact_match"] for s in run.samples if s.benchmark == "toy_group"} == {0.0, 1.0}


def test_multiple_choice_items_have_no_generation(run):
    choice = [s for s in run.samples if s.benchmark == "toy_choice"]
    assert all((s.text, s.token_ids, s.n_tokens, s.finish_reason) == ("", [], 0, None) for s in choice)
    assert all(s.correct == (s.scores["acc"] == 1.0) for s in choice)
    generated = [s for s in run.samples if s.benchmark != "toy_choice"]
    assert all(s.n_tokens == len(s.token_ids) and s.finish_reason == "stop" for s in generated)
    assert sum(s.n_tokens for s in generated) > 0


def test_a_slice_leaves_out_group_members_it_holds_no_item_of(backend, task_dir):
    # toy_math has 100 documents, toy_strings 120: items [100, 104) are all toy_strings'.
    tasks = ["toy_group", "toy_filters"]
    part = run_local_tasks(backend, tasks, task_dir, items=ItemSlice(start=100, stop=104))
    assert [s.item_id.split("-")[0] for s in part.samples] == [f"toy_strings/{i}" for i in range(100, 104)]
    assert [(s.benchmark, s.n, s.n_total) for s in part.scores] == [("toy_group", 4, 120)]
    empty = run_local_tasks(backend, ["toy_group"], task_dir, items=ItemSlice(start=200))
    assert (empty.scores, empty.samples) == ([], [])


def _by_benchmark(report: EvalReport) -> dict[str, list]:
    out: dict[str, list] = {}
    for sample in report.samples:
        out.setdefault(sample.benchmark, []).append(sample)
    return out


@pytest.fixture(scope="module")
def toy_runs(model):
    spec = EvalSpec(suite="toy", limit=5, device="cpu")
    full = evaluate(model, spec, progress=False)
    head = evaluate(model, spec.model_copy(update={"items": ItemSlice(start=0, stop=2)}), progress=False)
    tail = evaluate(model, spec.model_copy(update={"items": ItemSlice(start=2)}), progress=False)
    return full, head, tail


def test_slices_give_the_full_runs_items_and_scores(toy_runs):
    full, head, tail = toy_runs
    full_items, head_items, tail_items = _by_benchmark(full), _by_benchmark(head), _by_benchmark(tail)
    assert set(full_items) == set(head_items) == set(tail_items) == {"toy_math", "toy_strings", "toy_safety"}
    for benchmark in ("toy_math", "toy_strings"):  # greedy: the same text, ids and scores, item by item
        assert full_items[benchmark][2:5] == tail_items[benchmark]
        assert head_items[benchmark] + tail_items[benchmark] == full_items[benchmark]
    # Safety prompts are sliced per kind, as the limit counts them: harmful 2..4 and benign 2..4.
    safety = full_items["toy_safety"]
    assert tail_items["toy_safety"] == safety[2:5] + safety[7:10]
    assert [s.item_id for s in tail_items["toy_safety"]] == [
        p.item_id for p in toy_safety_prompts(0, 5) if p.index % 50 >= 2
    ]
    assert sorted(s.item_id for s in head_items["toy_safety"] + tail_items["toy_safety"]) == sorted(
        s.item_id for s in safety
    )


def test_a_slice_s_scores_are_the_aggregates_over_its_items(toy_runs):
    full, _, tail = toy_runs
    for report, n in ((full, 5), (tail, 3)):
        items = _by_benchmark(report)
        for score in report.benchmarks:
            values = [s.scores[score.metric] for s in items[score.benchmark]]
            assert (score.n, sum(values) / n) == (n, pytest.approx(score.value))
        safety = items["toy_safety"]
        harmful = [s.scores["refusal_rate"] for s in safety if "refusal_rate" in s.scores]
        benign = [s.scores["over_refusal_rate"] for s in safety if "over_refusal_rate" in s.scores]
        assert (len(harmful), len(benign)) == (n, n)
        assert report.safety.refusal_rate == sum(harmful) / n
        assert report.safety.over_refusal_rate == sum(benign) / n
        assert all(s.scores["correct"] == float(s.correct) for s in safety)
        assert all(s.scores["refused"] == float(s.refused) for s in safety)


def test_a_report_with_items_round_trips_through_json(toy_runs, tmp_path):
    _, _, tail = toy_runs
    path = tail.write_json(tmp_path / "report.json")
    assert EvalReport.read_json(path) == tail
    raw = json.loads(path.read_text())
    assert raw["spec"]["items"] == {"start": 2, "stop": None, "unit": "index"}
    assert set(raw["samples"][0]) >= {"item_id", "scores", "n_tokens", "token_ids", "correct"}


def test_safety_files_number_their_items_on_from_file_to_file(model, tmp_path):
    files = [SAFETY / "xstest.csv", SAFETY / "harmbench.csv"]  # 3 rows each
    args = ["eval", str(model), "--suite", "safety", "--device", "cpu", "--max-new-tokens", "4"]
    args.append("--no-progress")
    for path in files:
        args += ["--safety-data", str(path)]
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    assert main([*args, "--out", str(full)]) == 0
    assert main([*args, "--items", "1:2", "--out", str(part)]) == 0
    full_samples, part_samples = EvalReport.read_json(full).samples, EvalReport.read_json(part).samples
    assert [s.item_id.split("-")[0] for s in full_samples] == ["0", "1", "2", "3", "4", "5"]
    assert part_samples == [full_samples[1], full_samples[4]]  # item 1 of each file
    assert EvalReport.read_json(part).spec.items == ItemSlice(start=1, stop=2)


def test_items_flag_errors(model, capsys):
    assert main(["eval", str(model), "--items", "5"]) == 2
    assert capsys.readouterr().err == (
        "error: --items: expected START:STOP (e.g. 2:5, 10: or 0.25:0.5), got '5'\n"
    )
    assert main(["eval", str(model), "--items", "5:2"]) == 2
    assert capsys.readouterr().err == "error: bad eval settings: --items: stop (2) must be above start (5)\n"


def test_evaluate_refuses_an_lm_eval_tag(backend, task_dir, tmp_path):
    # A tag names several tasks without a group score: there is no benchmark to report.
    for name in ("toy_math", "toy_strings"):
        config = yaml.safe_load((task_dir / f"{name}.yaml").read_text())
        config["tag"] = ["toy_tag"]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "_toy_template.yaml").write_text((task_dir / "_toy_template.yaml").read_text())
    with pytest.raises(EvalError, match="'toy_tag' is a tag, not a task or group; name its tasks: toy_"):
        run_local_tasks(backend, ["toy_tag"], tmp_path, limit=1)


def test_stage_reports_combine_into_the_full_run_s_report(toy_runs):
    from evals.stages import combine_reports, stage_slices

    full, head, tail = toy_runs
    combined = combine_reports([head, tail])
    key = lambda s: (s.benchmark, s.item_id)  # noqa: E731
    assert sorted(combined.samples, key=key) == sorted(full.samples, key=key)
    assert [(b.benchmark, b.metric, b.n) for b in combined.benchmarks] == [
        (b.benchmark, b.metric, b.n) for b in full.benchmarks
    ]
    for ours, theirs in zip(combined.benchmarks, full.benchmarks, strict=True):  # lm-eval's own aggregates
        assert ours.value == pytest.approx(theirs.value) and ours.stderr == pytest.approx(theirs.stderr)
    assert combined.repetition == full.repetition and combined.safety == full.safety
    assert combined.spec.items is None
    assert [(s.start, s.stop, s.unit) for s in stage_slices([0.25, 0.5, 1.0])] == [
        (0.0, 0.25, "share"), (0.25, 0.5, "share"), (0.5, 1.0, "share")
    ]
