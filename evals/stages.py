"""Evaluating in stages (racing): the slices of each stage, and one report from several.

A stage is an `ItemSlice` of shares: stages ``[0.25, 0.5, 1.0]`` evaluate positions [0, 25%),
[25%, 50%) and [50%, 100%] of every benchmark's items, which never overlap and together cover them.
`combine_reports` joins the reports of the stages run so far into the report of their items, as if
those items had been evaluated in one run: the same samples (greedy decoding gives every item the
same generation in any batch) and aggregates recomputed from them.

Aggregates that cannot be recomputed from per-item values (a corpus-level metric such as BLEU, or
IFEval's per-instruction lists, which carry no per-item score) are left out of a combined report
rather than approximated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from evals.repetition import repetition_stats
from evals.spec import OVER_REFUSAL_RATE, REFUSAL_RATE, EvalReport, ItemSlice, SafetyScores


def stage_slices(stages: Sequence[float]) -> list[ItemSlice]:
    """The item slice of each stage.

    Args:
        stages: increasing shares ending at 1.0, e.g. ``[0.25, 0.5, 1.0]``.

    Returns:
        One slice per stage: [previous share, this share).
    """
    bounds = [0.0, *stages]
    return [ItemSlice.shares(start, stop) for start, stop in zip(bounds, bounds[1:], strict=False)]


def combine_reports(reports: Sequence[EvalReport]) -> EvalReport:
    """One report of the items of several stage reports of the same model and suite.

    Args:
        reports: the stages' reports (disjoint item slices), in stage order.

    Returns:
        Their samples together, the benchmark scores recomputed from the per-item scores (mean and
        its standard error), repetition and safety figures over every sample, and the summed time.
    """
    if len(reports) == 1:
        return reports[0]
    first = reports[0]
    samples = [sample for report in reports for sample in report.samples]
    scores = []
    for score in first.benchmarks:
        values = [s.scores[score.metric] for s in samples
                  if s.benchmark == score.benchmark and score.metric in s.scores]
        if not values:  # no per-item value: the aggregate cannot be recomputed
            continue
        scores.append(score.model_copy(update={
            "value": math.fsum(values) / len(values), "stderr": _stderr(values), "n": len(values),
        }))
    benchmarks = sorted({s.benchmark for s in samples})
    return first.model_copy(update={
        "spec": first.spec.model_copy(update={"items": None}),
        "benchmarks": scores,
        "repetition": repetition_stats(samples),
        "repetition_by_benchmark": {
            name: repetition_stats([s for s in samples if s.benchmark == name]) for name in benchmarks
        },
        "safety": _safety(first.safety, samples),
        "samples": samples,
        "seconds": sum(report.seconds for report in reports),
    })


def _stderr(values: list[float]) -> float | None:
    """Standard error of the mean (sample standard deviation / sqrt(n)), as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _safety(first: SafetyScores | None, samples: list) -> SafetyScores | None:
    if first is None:
        return None
    harmful = [s.scores[REFUSAL_RATE] for s in samples if REFUSAL_RATE in s.scores]
    benign = [s.scores[OVER_REFUSAL_RATE] for s in samples if OVER_REFUSAL_RATE in s.scores]
    return first.model_copy(update={
        "refusal_rate": math.fsum(harmful) / len(harmful) if harmful else None,
        "over_refusal_rate": math.fsum(benign) / len(benign) if benign else None,
        "n_harmful": len(harmful),
        "n_benign": len(benign),
    })
