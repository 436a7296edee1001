"""Repetition figures on crafted token sequences and saved looped outputs."""

from __future__ import annotations

import json
import random
import time
from array import array
from pathlib import Path

import pytest

from evals.repetition import (
    is_looping,
    is_truncated,
    loop_period,
    repetition_stats,
    score_sample,
    seq_rep_n,
)
from evals.spec import LoopThresholds

DATA = Path(__file__).parent / "data"


def _clean(n: int, seed: int = 0) -> list[int]:
    """Tokens with no periodic tail: distinct ids."""
    ids = list(range(1000, 1000 + n))
    random.Random(seed).shuffle(ids)
    return ids


def test_seq_rep_4_exact_values():
    assert seq_rep_n([1, 2, 3, 4, 5, 6]) == 0.0  # 3 four-grams, all unique
    assert seq_rep_n([7] * 10) == pytest.approx(1 - 1 / 7)  # 7 four-grams, 1 unique
    assert seq_rep_n([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 5)
    assert seq_rep_n([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(1 - 2 / 5)


def test_empty_and_short_outputs_have_no_repetition():
    assert seq_rep_n([]) == 0.0
    assert seq_rep_n([1, 2, 3]) == 0.0
    assert loop_period([]) is None
    assert not is_looping([])
    assert loop_period([5]) is None


def test_period_1_loop():
    assert loop_period([9] * 32) == 1
    assert loop_period([9] * 31) is None  # shorter than min_tail_tokens=32


def test_period_37_loop():
    unit = _clean(37)
    ids = unit * 3  # 111 tokens = min_repeats * 37
    assert loop_period(ids) == 37
    assert loop_period(unit * 2 + unit[:36]) is None  # 2.97 copies < min_repeats


def test_loop_after_long_clean_prefix():
    prefix = _clean(1500, seed=1)
    ids = prefix + [11, 12, 13] * 20
    assert loop_period(ids) == 3
    assert loop_period(prefix) is None


def test_loop_ending_mid_unit_counts():
    ids = _clean(50) + [4, 5, 6, 7] * 10 + [4, 5]
    assert loop_period(ids) == 4


def test_phrase_said_twice_is_not_a_loop():
    phrase = _clean(20, seed=2)
    ids = _clean(30, seed=3) + phrase + phrase
    assert loop_period(ids) is None
    assert seq_rep_n(ids) > 0  # the repeat still shows in seq_rep_4


def test_loop_in_the_middle_only_is_not_looping():
    ids = [8] * 100 + _clean(40, seed=4)  # recovered: the tail is clean
    assert loop_period(ids) is None


def test_period_longer_than_max_period_is_not_found():
    unit = _clean(70)
    ids = unit * 4
    assert loop_period(ids) is None
    assert loop_period(ids, LoopThresholds(max_period=80)) == 70


def test_thresholds_change_the_decision():
    ids = _clean(10) + [3, 4] * 6  # 12-token periodic tail, 6 copies
    assert loop_period(ids) is None
    assert loop_period(ids, LoopThresholds(min_tail_tokens=12)) == 2
    assert loop_period(ids, LoopThresholds(min_tail_tokens=12, min_repeats=7)) is None


def test_saved_looped_outputs():
    rows = [json.loads(line) for line in (DATA / "looped_outputs.jsonl").read_text().splitlines()]
    assert {r["looping"] for r in rows} == {True, False}
    for row in rows:
        assert loop_period(row["token_ids"]) == row["period"], row["name"]
        assert is_looping(row["token_ids"]) == row["looping"], row["name"]


def test_truncation_and_sample_scoring():
    assert is_truncated("length") and not is_truncated("stop")
    sample = score_sample("bench", "p", "text", [9] * 40, "length", item_id="0-x")
    assert (sample.looping, sample.loop_period, sample.truncated) == (True, 1, True)
    assert (sample.item_id, sample.n_tokens) == ("0-x", 40)
    assert sample.seq_rep_4 == pytest.approx(1 - 1 / 37)


def test_repetition_stats_aggregates():
    samples = [
        score_sample("b", "p", "", [9] * 40, "length", item_id="0-x"),
        score_sample("b", "p", "", _clean(40), "stop", item_id="1-x"),
        score_sample("b", "p", "", [], "stop", item_id="2-x"),
        score_sample("b", "p", "", _clean(10), "length", item_id="3-x"),
        # an item scored by log-likelihood: no generation, counted in no repetition figure
        score_sample("b", "p", "", [], None, item_id="4-x"),
    ]
    stats = repetition_stats(samples)
    assert stats.n == 4
    assert stats.repetition_rate == 0.25
    assert stats.truncation_rate == 0.5
    assert stats.mean_seq_rep_4 == pytest.approx((1 - 1 / 37) / 4)
    empty = repetition_stats([])
    assert (empty.n, empty.repetition_rate, empty.mean_seq_rep_4, empty.truncation_rate) == (0, 0.0, 0.0, 0.0)


def test_linear_time_on_long_samples():
    """10,000 samples of 2,048 tokens take seconds: here a fifth of that, with a generous bound."""
    rng = random.Random(0)
    samples = []
    for i in range(2000):
        ids = list(array("H", rng.randbytes(2 * 2048)))  # 2,048 random ids < 65,536
        if i % 2:  # half of them loop over their last 1,000 tokens
            unit = ids[-1000:-993]
            ids[-1000:] = (unit * 143)[:1000]
        samples.append(ids)
    start = time.perf_counter()
    flags = [(seq_rep_n(ids), is_looping(ids)) for ids in samples]
    elapsed = time.perf_counter() - start
    assert sum(looping for _, looping in flags) == 1000
    assert elapsed < 15.0, f"{elapsed:.1f} s for 2,000 x 2,048 tokens"


def test_rep_w_hand_computed():
    from evals.repetition import rep_w

    assert rep_w([]) == 0.0
    assert rep_w([5]) == 0.0  # the first token has no predecessor
    assert rep_w([1, 2, 1, 3]) == 0.25  # only the second 1 is among its previous 16 tokens
    assert rep_w([7] * 8) == 7 / 8
    # w = 2: token t counts when it equals ids[t-1] or ids[t-2].
    #   ids   1 2 3 1 2 1 1
    #   hit   0 0 0 0 0 1 1   (the 1 at t=3 is 3 back: outside the window of 2)
    assert rep_w([1, 2, 3, 1, 2, 1, 1], w=2) == 2 / 7
    #   w = 3, same ids: the 1 at t=3 (3 back) and the 2 at t=4 (3 back) now count too
    assert rep_w([1, 2, 3, 1, 2, 1, 1], w=3) == 4 / 7
    with pytest.raises(ValueError, match="window must be >= 1"):
        rep_w([1], w=0)


def test_rep_w_matches_the_definition_on_random_ids():
    from evals.repetition import rep_w

    rng = random.Random(3)
    for _ in range(50):
        ids = [rng.randrange(6) for _ in range(rng.randrange(0, 80))]
        w = rng.randrange(1, 20)
        expected = sum(ids[t] in ids[max(0, t - w):t] for t in range(len(ids))) / len(ids) if ids else 0.0
        assert rep_w(ids, w) == pytest.approx(expected, abs=0)


def test_score_sample_and_stats_carry_rep_w():
    samples = [
        score_sample("b", "p", "", [1, 2, 1, 3], "stop", item_id="0-a"),
        score_sample("b", "p", "", [7] * 8, "length", item_id="1-b"),
    ]
    assert [s.rep_w for s in samples] == [0.25, 7 / 8]
    assert repetition_stats(samples).mean_rep_w == pytest.approx((0.25 + 7 / 8) / 2)
