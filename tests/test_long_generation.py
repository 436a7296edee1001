"""The long-generation probe (suite `toy_long`): open-ended toy prompts generated far past the
training length, each item's looping / seq_rep_4 / rep-w / truncation stored as per-item scores."""

from __future__ import annotations

import pytest

from evals import toytasks
from evals.catalog import TOY_LONG, get_suite
from evals.repetition import is_looping, rep_w, seq_rep_n
from evals.spec import LONG_GENERATION_METRICS, EvalSpec, item_id
from evals.suites import evaluate, long_generation_prompts
from evals.zoo import save_untrained
from tasks.results_db import samples_from_report


def test_open_ended_prompts_are_distinct_deterministic_and_in_the_toy_format():
    prompts = toytasks.long_prompts(0, 40)
    assert len(set(prompts)) == 40 and prompts == toytasks.long_prompts(0, 40)
    assert prompts != toytasks.long_prompts(1, 40)
    assert toytasks.long_prompts(0, 5) == prompts[:5]  # a smaller probe is a prefix of a larger one
    assert toytasks.render_prompt(prompts[0]) == f"<s>Q:{prompts[0]}\nA:"


def test_the_suite_and_the_spec_defaults():
    suite = get_suite("toy_long")
    assert suite.long_generation and suite.lm_eval_tasks == ("toy_math", "toy_strings")
    spec = EvalSpec(suite="toy_long")
    assert (spec.long_gen.max_new_tokens, spec.long_gen.prompts, spec.gen.max_new_tokens) == (512, 40, 48)
    assert LONG_GENERATION_METRICS == ("looping", "seq_rep_4", "rep_w", "truncated")


def test_limit_and_slice_apply_to_the_open_ended_prompts():
    spec = EvalSpec(suite="toy_long", limit=6, items={"start": 2, "stop": 4}, long_gen={"prompts": 10})
    prompts = toytasks.long_prompts(0, 10)
    assert long_generation_prompts(spec) == [(2, prompts[2]), (3, prompts[3])]


@pytest.fixture(scope="module")
def untrained_report(tmp_path_factory):
    # An untrained model never emits EOS: every open-ended generation runs to max_new_tokens.
    model = save_untrained(tmp_path_factory.mktemp("untrained") / "m", size="tiny", seed=0)
    spec = EvalSpec(suite="toy_long", device="cpu", limit=3, long_gen={"max_new_tokens": 80, "prompts": 5})
    return evaluate(model, spec, progress=False)


def test_each_open_ended_item_is_scored_from_its_tokens(untrained_report):
    samples = [s for s in untrained_report.samples if s.benchmark == TOY_LONG]
    prompts = toytasks.long_prompts(0, 5)[:3]
    assert [s.item_id for s in samples] == [item_id(i, {"prompt": p}) for i, p in enumerate(prompts)]
    for sample in samples:
        assert sample.n_tokens == 80 and sample.truncated and sample.finish_reason == "length"
        assert sample.scores == {
            "looping": float(is_looping(sample.token_ids)),
            "seq_rep_4": seq_rep_n(sample.token_ids, 4),
            "rep_w": rep_w(sample.token_ids, 16),
            "truncated": 1.0,
        }
    scores = {s.metric: s for s in untrained_report.benchmarks if s.benchmark == TOY_LONG}
    assert list(scores) == list(LONG_GENERATION_METRICS)
    for metric, score in scores.items():
        assert score.value == pytest.approx(sum(s.scores[metric] for s in samples) / 3)
        assert (score.n, score.n_total, score.higher_is_better) == (3, 5, False)
    metrics = untrained_report.metrics()
    assert metrics["toy_long.truncated"] == 1.0 and "toy_math.exact_match" in metrics


def test_open_ended_items_are_stored_per_item_like_other_benchmarks(untrained_report):
    rows = [r for r in samples_from_report(untrained_report) if r.benchmark == TOY_LONG]
    assert sorted({r.metric for r in rows}) == sorted(LONG_GENERATION_METRICS)
    assert len(rows) == 3 * 4
    by_key = {(r.item_id, r.metric): r for r in rows}
    for sample in (s for s in untrained_report.samples if s.benchmark == TOY_LONG):
        assert by_key[(sample.item_id, "rep_w")].score == sample.rep_w
        assert by_key[(sample.item_id, "truncated")].truncated is True
