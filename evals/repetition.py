"""Repetition figures of generations, as pure functions on token ids.

Definitions (per generation):
- `seq_rep_n(ids, n)`: 1 - unique n-grams / n-grams (n = 4 by default; 0.0 when there are no
  n-grams). 0 means no n-gram occurs twice; values near 1 mean the text is one n-gram over and over.
- `loop_period(ids, thresholds)`: the shortest period p (1 <= p <= max_period) such that the
  generation ENDS in a unit of p tokens repeated back to back over a tail of at least
  `min_tail_tokens` tokens and at least `min_repeats` copies; None when there is none.
  `looping` = a period was found. A loop after a long clean prefix is still a loop (only the
  tail matters); a clean answer that repeats a phrase twice is not (two copies < min_repeats).
- `truncated`: the generation hit max_new_tokens (finish_reason == "length").
- `rep_w(ids, w)`: rep-w of Fu et al. 2021 ("A Theoretical Analysis of the Repetition Problem in
  Text Generation", AAAI): the share of tokens equal to one of the `w` tokens just before them
  (w = 16). The first token has no predecessor and never counts as repeated; 0.0 when empty.

Per set of generations (`repetition_stats`): repetition_rate = share looping, mean seq_rep_4, mean rep-w,
truncation_rate = share truncated. Items scored without generating (log-likelihood tasks,
`finish_reason` None) are not generations and count in none of these.

Cost is linear in the length of a generation: seq_rep_n hashes each n-gram once; loop_period
scans backwards once per candidate period and stops at the first mismatch or as soon as the
thresholds are met, so it reads at most max_period * (min_tail_tokens + min_repeats * max_period)
tokens whatever the length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from evals.spec import FinishReason, LoopThresholds, RepetitionStats, Sample

DEFAULT_THRESHOLDS = LoopThresholds()
REP_W_WINDOW = 16  # Fu et al. 2021 report rep-w with w = 16


def seq_rep_n(ids: Sequence[int], n: int = 4) -> float:
    """Share of repeated n-grams: 1 - unique n-grams / n-grams.

    Args:
        ids: token ids of one generation (the prompt excluded).
        n: n-gram length.

    Returns:
        A value in [0, 1); 0.0 when the generation has fewer than n tokens.

    Example:
        >>> round(seq_rep_n([1, 2, 3, 4, 1, 2, 3, 4], 4), 6)  # 5 four-grams, 4 unique
        0.2
    """
    count = len(ids) - n + 1
    if count <= 0:
        return 0.0
    unique = len(set(zip(*(ids[i:] for i in range(n)), strict=False)))
    return 1.0 - unique / count


def rep_w(ids: Sequence[int], w: int = REP_W_WINDOW) -> float:
    """rep-w (Fu et al. 2021): share of tokens that already occur among the previous ``w`` tokens.

    Token t counts when ``ids[t] in ids[max(0, t - w):t]``; the result is that count over
    ``len(ids)``. One pass with a sliding window of counts: linear in the length.

    Args:
        ids: token ids of one generation (the prompt excluded).
        w: the window, in tokens (>= 1).

    Returns:
        A value in [0, 1); 0.0 for an empty generation.

    Example:
        >>> rep_w([1, 2, 1, 3], w=16)  # only the second 1 repeats: 1 of 4 tokens
        0.25
    """
    if w < 1:
        raise ValueError(f"rep_w window must be >= 1, got {w}")
    if not ids:
        return 0.0
    window: dict[int, int] = {}
    repeated = 0
    for t, token in enumerate(ids):
        if window.get(token, 0) > 0:
            repeated += 1
        window[token] = window.get(token, 0) + 1
        if t >= w:  # the token leaving the window of the next position
            window[ids[t - w]] -= 1
    return repeated / len(ids)


def _periodic_tail_reaches(ids: Sequence[int], period: int, needed: int) -> bool:
    """Whether the last `needed` tokens of `ids` repeat with this period (ids[i] == ids[i + period])."""
    end = len(ids)
    if needed > end:
        return False
    # The tail [end - needed, end) has period p iff every position in it, except the last p,
    # equals the token p further on; scan backwards and stop at the first mismatch.
    return all(ids[i] == ids[i + period] for i in range(end - period - 1, end - needed - 1, -1))


def loop_period(ids: Sequence[int], thresholds: LoopThresholds = DEFAULT_THRESHOLDS) -> int | None:
    """The shortest period of a loop the generation ends in, or None when it does not loop.

    Args:
        ids: token ids of one generation.
        thresholds: max_period, min_repeats and min_tail_tokens (see `LoopThresholds`).

    Returns:
        The period p in 1..max_period of the repeated unit, or None.

    Example:
        >>> loop_period([5, 6, 7] + [1, 2] * 20)
        2
    """
    max_period = min(thresholds.max_period, len(ids) // 2)
    for period in range(1, max_period + 1):
        needed = max(thresholds.min_tail_tokens, math.ceil(thresholds.min_repeats * period))
        if _periodic_tail_reaches(ids, period, needed):
            return period
    return None


def is_looping(ids: Sequence[int], thresholds: LoopThresholds = DEFAULT_THRESHOLDS) -> bool:
    """Whether the generation ends in a loop (see `loop_period`).

    Args:
        ids: token ids of one generation.
        thresholds: the loop thresholds.

    Returns:
        True when a loop period is found.
    """
    return loop_period(ids, thresholds) is not None


def is_truncated(finish_reason: FinishReason | None) -> bool:
    """Whether a generation hit max_new_tokens instead of stopping.

    Args:
        finish_reason: "stop" or "length" (None: no generation).

    Returns:
        True for "length".
    """
    return finish_reason == "length"


def repetition_stats(samples: Sequence[Sample]) -> RepetitionStats:
    """Aggregate repetition figures of scored samples.

    Args:
        samples: samples carrying `looping`, `seq_rep_4` and `truncated`; those without a
            generation (`finish_reason` None) are left out.

    Returns:
        repetition_rate, mean_seq_rep_4, truncation_rate and n (all rates 0.0 when empty).
    """
    samples = [s for s in samples if s.finish_reason is not None]
    n = len(samples)
    if n == 0:
        return RepetitionStats(repetition_rate=0.0, mean_seq_rep_4=0.0, truncation_rate=0.0, n=0)
    return RepetitionStats(
        repetition_rate=sum(s.looping for s in samples) / n,
        mean_seq_rep_4=sum(s.seq_rep_4 for s in samples) / n,
        mean_rep_w=math.fsum(s.rep_w for s in samples) / n,  # exact sum: the same in any sample order
        truncation_rate=sum(s.truncated for s in samples) / n,
        n=n,
    )


def score_sample(
    benchmark: str,
    prompt: str,
    text: str,
    token_ids: Sequence[int],
    finish_reason: FinishReason | None,
    thresholds: LoopThresholds = DEFAULT_THRESHOLDS,
    *,
    item_id: str,
) -> Sample:
    """A `Sample` with its repetition figures filled in.

    Args:
        benchmark: benchmark the generation belongs to.
        prompt: the prompt as given to the model.
        text: the generated text.
        token_ids: the generated token ids.
        finish_reason: "stop" or "length"; None for an item scored without generating.
        thresholds: the loop thresholds.
        item_id: the item's stable id (`evals.spec.item_id`).

    Returns:
        The sample (target/correct/refused/scores left for the caller to set).
    """
    period = loop_period(token_ids, thresholds)
    return Sample(
        benchmark=benchmark,
        item_id=item_id,
        prompt=prompt,
        text=text,
        token_ids=list(token_ids),
        n_tokens=len(token_ids),
        finish_reason=finish_reason,
        seq_rep_4=seq_rep_n(token_ids, 4),
        rep_w=rep_w(token_ids),
        looping=period is not None,
        loop_period=period,
        truncated=is_truncated(finish_reason),
    )
