"""`scf report`: the SCF-RKL paper's claims tested on the pipeline's own results (docs/paper-toy/REPORT.md).

Reads, for each pipeline config, the per-item scores in its DuckDB file (``samples``) and the merge
reports the night wrote (``<workdir>/artifacts/<candidate id>/merge_report.json``), and writes a
Markdown report plus PNG figures: tables shaped like the paper's Tables 1-4 and 10, the repetition
rate (Figure 1), per-benchmark deltas against the parents' mean (Figure 8), parameter sources
(Figure 7), spectral shift and principal angles per layer (Figures 3-4), per-layer sparsity, and a
verdict for each of the paper's eight claims.

Statistics (``tasks.stats``, 95%, seeded: the same database gives the same report):

- a table cell is the mean over *runs* (one run = one zoo seed x one merge seed) of the run's mean
  over items; its interval a Wilson interval when the runs are 0/1 scores on the same number of
  items (the mean of their means is then the pooled share), else the stratified bootstrap with runs
  as strata (items resampled within each run);
- a comparison of A with B is paired over the items both were scored on, run by run (a random
  method's merge seeds each paired with the other side), and over benchmarks when it is a mean of
  several: the stratified paired bootstrap over those strata. Each zoo seed's own estimate is listed
  beside it.

A verdict is ``confirmed`` or ``refuted`` only when the intervals decide it; ``inconclusive`` when
the differences that decide it are inside the noise (an interval straddles the line); ``untestable``
when the toy cannot measure it, and ``not run`` when the results it needs are missing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import results_db
from tasks.config import PipelineConfig, load_config
from tasks.errors import PipelineError
from tasks.stats import Interval, paired_difference, proportion_interval, stratified_paired_difference

CONFIDENCE = 0.95
SEED = 0
RESAMPLES = 10_000
# The paper's baselines (Tables 1-4, Figures 1, 3-7): the claims about "dense methods" are judged on them.
PAPER_BASELINES = ("task_arithmetic", "dare_linear", "ties", "dare_ties", "sce")
METHOD_ORDER = ("scf_rkl", "scf_kl", *PAPER_BASELINES, "slerp", "della", "breadcrumbs")
SCENARIOS = {"zoo:strings": "complementary", "zoo:weak": "strong-weak", "zoo:safety": "safety"}
SCENARIO_TITLES = {
    "complementary": "Complementary fusion: math + strings (paper Tables 1-2)",
    "strong-weak": "Strong-weak fusion: math (strong) + weak (paper Tables 3-4)",
    "safety": "Safety + reasoning: math + safety (paper Figures 9-10)",
}
KEEP_TOLERANCE = 0.05  # "keeps the level": the paired interval's lower bound above -0.05
SPARSITY_CLAIM = (0.05, 0.15)  # share of each layer taken from the secondary (claim 7)
ANGLE_CLAIM = 40.0  # degrees: SCF-RKL's largest principal angle (claim 6)
NEITHER_CLAIM = 0.8  # dense methods' share of values from neither parent (claim 5)


@dataclass(frozen=True)
class Column:
    """One table column: a benchmark's metric (the names of DuckDB ``samples``)."""

    benchmark: str
    metric: str
    header: str
    higher_is_better: bool

    @property
    def key(self) -> str:
        return f"{self.benchmark}.{self.metric}"


MATH = Column("toy_math", "exact_match", "math ↑", True)
STRINGS = Column("toy_strings", "exact_match", "strings ↑", True)
REFUSAL = Column("toy_safety", "refusal_rate", "refusal ↑", True)
OVER_REFUSAL = Column("toy_safety", "over_refusal_rate", "over-refusal ↓", False)
LOOPING = Column("toy_long", "looping", "looping ↓", False)
SEQ_REP = Column("toy_long", "seq_rep_4", "seq-rep-4 ↓", False)
REP_W = Column("toy_long", "rep_w", "rep-w ↓", False)
TRUNCATED = Column("toy_long", "truncated", "truncated ↓", False)
SCORE_COLUMNS = (MATH, STRINGS, REFUSAL, OVER_REFUSAL)
REPETITION_COLUMNS = (LOOPING, SEQ_REP, REP_W, TRUNCATED)
# What "capability" means per scenario (claims 2, 3 and 8): the benchmarks the parents were trained for.
CAPABILITIES = {"complementary": (MATH, STRINGS), "strong-weak": (MATH, STRINGS), "safety": (MATH, REFUSAL)}


@dataclass
class Model:
    """One evaluated model of a run: its row key in the tables, per-item scores, merge report."""

    id: str
    kind: str
    label: str
    row: str  # "base", "secondary" or the merge method
    merge_seed: int | None
    items: dict[str, dict[str, float]]  # "<benchmark>.<metric>" -> item_id -> score
    merge_report: dict | None = None


@dataclass
class Run:
    """One pipeline config's results: a scenario on one zoo seed."""

    name: str
    scenario: str
    zoo_seed: int
    zoo_size: str
    parents: dict[str, str]  # "base"/"secondary" -> the parent's zoo model name
    models: list[Model] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: tuple[float, float] = (0.0, 0.0)  # merging, evaluating (summed over its models)

    def of(self, row: str) -> list[Model]:
        """The models of a table row (one per merge seed for a random method)."""
        return [m for m in self.models if m.row == row]


@dataclass(frozen=True)
class Verdict:
    """The verdict on one claim, with the numbers that decide it."""

    claim: int
    title: str
    verdict: str  # confirmed / refuted / inconclusive / untestable / not run
    evidence: list[str]


# ------------------------------------------------------------------------------ loading


def config_paths(paths: Sequence[Path]) -> list[Path]:
    """Config files named directly or as directories of ``*.yaml`` (sorted), duplicates dropped."""
    out: list[Path] = []
    for path in paths:
        found = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        if path.is_dir() and not found:
            raise PipelineError(f"{path}: no *.yaml pipeline configs in this directory")
        out += [p for p in found if p not in out]
    return out


def scenario_of(config: PipelineConfig) -> str:
    """``complementary``, ``strong-weak`` or ``safety`` from the config's secondary; else its name."""
    secondary = config.sources.secondary[0] if len(config.sources.secondary) == 1 else None
    return SCENARIOS.get(secondary or "", config.name)


def load_run(config: PipelineConfig) -> Run | None:
    """A config's results from its DuckDB file and merge reports; None when it has none yet."""
    db = config.duckdb_path
    run = Run(
        config.name,
        scenario_of(config),
        config.zoo.seed,
        config.zoo.size,
        {"base": _short(config.sources.base), "secondary": _short(config.sources.secondary[0])},
    )
    if not db.exists():
        return None
    seeds = {c.label: c.seed for c in config.expand()}
    items: dict[str, dict[str, dict[str, float]]] = {}
    for model_id, benchmark, metric, item, score in results_db.item_scores(db, config.name):
        items.setdefault(model_id, {}).setdefault(f"{benchmark}.{metric}", {})[item] = score
    for row in results_db.report_models(db, config.name):
        if row["status"] != "ok":
            run.failed.append(f"{row['label']}: {row['failure']}")
            continue
        if row["kind"] == "parent":
            key = "base" if row["label"].startswith("base=") else "secondary"
            run.models.append(Model(row["id"], "parent", row["label"], key, None, items.get(row["id"], {})))
            continue
        report_file = config.workdir / "artifacts" / row["id"] / "merge_report.json"
        merge_report = json.loads(report_file.read_text()) if report_file.is_file() else None
        run.models.append(
            Model(
                row["id"],
                "merge",
                row["label"],
                row["method"],
                seeds.get(row["label"]),
                items.get(row["id"], {}),
                merge_report,
            )
        )
    run.seconds = results_db.compute_seconds(db, config.name)
    return run if run.models else None


def _short(ref: str) -> str:
    return ref.removeprefix("zoo:").split("@")[0].rstrip("/").split("/")[-1]


# ------------------------------------------------------------------------------ statistics


def _interval_of_strata(strata: list[list[float]]) -> Interval:
    """Mean over strata of each stratum's mean, with its interval (Wilson for equal-sized 0/1 strata)."""
    binary = all(v in (0.0, 1.0) for values in strata for v in values)
    if binary and len({len(values) for values in strata}) == 1:
        # Equal-sized 0/1 strata: the mean of their means is the pooled share; Wilson's interval
        # keeps a width where the bootstrap collapses (every item 0 gives [0, 0]).
        values = [v for stratum in strata for v in stratum]
        return proportion_interval(int(sum(values)), len(values), CONFIDENCE)
    pairs = [(values, [0.0] * len(values)) for values in strata]
    return stratified_paired_difference(pairs, CONFIDENCE, seed=SEED, resamples=RESAMPLES)


def cell(runs: Sequence[Run], row: str, column: Column) -> Interval | None:
    """A table cell: the row's mean on the column over every run and merge seed, with its interval."""
    strata = [
        list(m.items[column.key].values()) for run in runs for m in run.of(row) if m.items.get(column.key)
    ]
    return _interval_of_strata(strata) if strata else None


def compare(runs: Sequence[Run], row_a: str, row_b: str, columns: Sequence[Column]) -> Interval | None:
    """Paired interval of A - B (oriented: positive = A better), over runs, seeds and columns.

    Each stratum is one run x one model of A x one model of B x one column, on the items both
    were scored on. One stratum of 0/1 scores gives Newcombe's interval, else the stratified bootstrap.
    """
    pairs = _pairs(runs, row_a, row_b, columns)
    if not pairs:
        return None
    binary = all(v in (0.0, 1.0) for pair in pairs for side_ in pair for v in side_)
    if len(pairs) == 1 or (binary and len({len(a) for a, _ in pairs}) == 1):
        # Equal-sized 0/1 strata: the mean of their mean differences is the pooled one (Newcombe).
        left = [v for a, _ in pairs for v in a]
        right = [v for _, b in pairs for v in b]
        return paired_difference(left, right, CONFIDENCE, seed=SEED, resamples=RESAMPLES)
    return stratified_paired_difference(pairs, CONFIDENCE, seed=SEED, resamples=RESAMPLES)


def per_seed(runs: Sequence[Run], row_a: str, row_b: str, columns: Sequence[Column]) -> str:
    """Each zoo seed's estimate of A - B, e.g. ``zoo0 +0.12, zoo1 -0.03``."""
    parts = []
    for seed in sorted({run.zoo_seed for run in runs}):
        interval = compare([r for r in runs if r.zoo_seed == seed], row_a, row_b, columns)
        if interval is not None:
            parts.append(f"zoo{seed} {interval.estimate:+.2f}")
    return ", ".join(parts)


def side(interval: Interval, line: float = 0.0) -> str:
    """``above`` / ``below`` when the whole interval is on one side of ``line``, else ``noise``."""
    if interval.low > line:
        return "above"
    if interval.high < line:
        return "below"
    return "noise"


def fmt(interval: Interval | None, digits: int = 2) -> str:
    """``0.71 [0.62, 0.79] n=100`` (or ``-`` when there is nothing to show)."""
    if interval is None:
        return "-"
    return f"{interval.format(digits)} n={interval.n}"


# ------------------------------------------------------------------------------ merge-report figures


def fractions(model: Model) -> dict[str, float] | None:
    """Shares of the fused values equal to the base's, a secondary's, or neither (paper Figure 7)."""
    if model.merge_report is None:
        return None
    raw = model.merge_report["totals"]["fraction_from"]
    secondary = sum(v for k, v in raw.items() if k.startswith("secondary") or k.startswith("other"))
    return {"base": raw.get("base", 0.0), "secondary": secondary, "neither": raw.get("neither", 0.0)}


def layer_diagnostics(model: Model) -> dict[int, dict[str, float]]:
    """Per layer: the largest principal angle (deg) and mean normalized spectral shift of its matrices."""
    diagnostics = (model.merge_report or {}).get("diagnostics")
    if not diagnostics:
        return {}
    out: dict[int, dict[str, list[float]]] = {}
    for name, angle in diagnostics["principal_angle_deg"].items():
        layer = _layer(name)
        if layer is not None:
            entry = out.setdefault(layer, {"angle": [], "nss": []})
            entry["angle"].append(angle)
            entry["nss"].append(diagnostics["spectral_shift"][name])
    return {
        k: {"angle": max(v["angle"]), "nss": sum(v["nss"]) / len(v["nss"])} for k, v in sorted(out.items())
    }


def secondary_share_per_layer(model: Model) -> dict[int, float]:
    """Per layer: the share of its elements taken from the secondary (1 - sparsity for SCF)."""
    diagnostics = (model.merge_report or {}).get("diagnostics")
    if not diagnostics:
        return {}
    return {int(k): 1.0 - v for k, v in diagnostics["per_layer_sparsity"].items() if k.isdigit()}


def _layer(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _values(runs: Sequence[Run], row: str, get: Any) -> list[float]:
    return [v for run in runs for m in run.of(row) for v in get(m)]


# ------------------------------------------------------------------------------ the claims


def verdicts(runs: Sequence[Run]) -> list[Verdict]:
    """A verdict on each of the paper's eight claims from the runs' results."""
    by = {s: [r for r in runs if r.scenario == s] for s in ("complementary", "strong-weak", "safety")}
    return [
        claim_repetition(list(runs)),
        claim_complementary(by["complementary"]),
        claim_strong_weak(by["strong-weak"]),
        claim_safety(by["safety"]),
        claim_discrete(list(runs)),
        claim_geometry(list(runs)),
        claim_sparsity(list(runs)),
        claim_rkl_vs_kl(list(runs)),
    ]


def _rows(runs: Sequence[Run], rows: Sequence[str]) -> list[str]:
    return [row for row in rows if any(run.of(row) for run in runs)]


def claim_repetition(runs: list[Run]) -> Verdict:
    """Claim 1: dense merges amplify repetition (toward 100%), SCF-RKL stays near the base's rate."""
    title = "Dense merges amplify repetition, SCF-RKL stays near the base's rate (Figure 1)"
    baselines = _rows(runs, PAPER_BASELINES)
    if not runs or not any(run.of("scf_rkl") for run in runs) or not baselines:
        return Verdict(1, title, "not run", ["no run with SCF-RKL and the paper's baselines"])
    evidence = [f"looping rate on {LOOPING.benchmark} (open-ended prompts to the long_gen length):"]
    for row in ("base", "scf_rkl", *baselines):
        evidence.append(f"{row}: {fmt(cell(runs, row, LOOPING), 3)}")
    amplified, near_zero = [], []
    for row in baselines:
        rise = compare(runs, "base", row, [LOOPING])  # base - method, oriented: positive = method loops more
        evidence.append(f"{row} - base: {_rise(rise)} ({per_seed(runs, 'base', row, [LOOPING])})")
        if side(rise) == "above":
            amplified.append(row)
        rate = cell(runs, row, LOOPING)
        if rate is not None and rate.high < 0.5:
            near_zero.append(row)
    scf = compare(runs, "base", "scf_rkl", [LOOPING])
    evidence.append(f"scf_rkl - base: {_rise(scf)}")
    scf_loops_more = side(scf) == "above"
    if len(amplified) * 2 >= len(baselines) and not scf_loops_more:
        beats = [row for row in amplified if side(compare(runs, "scf_rkl", row, [LOOPING])) == "above"]
        if len(beats) == len(amplified):
            evidence.append(f"amplified by {', '.join(amplified)}; SCF-RKL loops less than each of them")
            return Verdict(1, title, "confirmed", evidence)
    if scf_loops_more or (not amplified and len(near_zero) == len(baselines)):
        why = (
            "SCF-RKL itself loops more than the base"
            if scf_loops_more
            else "no paper baseline is shown to loop more than the base, and every one's looping rate is "
            "below 50% with 95% confidence: no amplification toward 100% at this scale"
        )
        evidence.append(why)
        return Verdict(1, title, "refuted", evidence)
    evidence.append("the differences that decide it are inside the noise")
    return Verdict(1, title, "inconclusive", evidence)


def _rise(interval: Interval | None) -> str:
    """A base - method interval of an oriented lower-is-better metric read as method - base."""
    return fmt(interval, 3)


def _vs_baselines(runs: list[Run], columns: Sequence[Column], claim: int, title: str) -> Verdict:
    baselines = _rows(runs, PAPER_BASELINES)
    if not runs or not any(run.of("scf_rkl") for run in runs) or not baselines:
        return Verdict(claim, title, "not run", ["no run of this scenario with SCF-RKL and the baselines"])
    names = " and ".join(c.key for c in columns)
    evidence = [f"SCF-RKL minus each baseline, mean of {names} (paired):"]
    sides = {}
    for row in baselines:
        interval = compare(runs, "scf_rkl", row, columns)
        sides[row] = side(interval)
        evidence.append(f"vs {row}: {fmt(interval)} ({per_seed(runs, 'scf_rkl', row, columns)})")
    better = [r for r, s in sides.items() if s == "above"]
    worse = [r for r, s in sides.items() if s == "below"]
    if worse:
        evidence.append(f"SCF-RKL is worse than {', '.join(worse)}")
        return Verdict(claim, title, "refuted", evidence)
    if len(better) == len(baselines):
        return Verdict(claim, title, "confirmed", evidence)
    evidence.append(f"better than {', '.join(better) or 'none'}; inside the noise against the rest")
    return Verdict(claim, title, "inconclusive", evidence)


def claim_complementary(runs: list[Run]) -> Verdict:
    """Claim 2: in complementary fusion SCF-RKL keeps both parents' capabilities better than dense methods."""
    title = "Complementary fusion: SCF-RKL keeps both parents' skills better than dense methods (Tables 1-2)"
    return _vs_baselines(runs, CAPABILITIES["complementary"], 2, title)


def claim_strong_weak(runs: list[Run]) -> Verdict:
    """Claim 3: in strong-weak fusion SCF-RKL keeps the strong model's level; dense methods drag it down."""
    title = (
        "Strong-weak fusion: SCF-RKL keeps the strong model's level, dense methods drag it down (Tables 3-4)"
    )
    baselines = _rows(runs, PAPER_BASELINES)
    if not runs or not any(run.of("scf_rkl") for run in runs) or not baselines:
        return Verdict(3, title, "not run", ["no strong-weak run with SCF-RKL and the baselines"])
    columns = CAPABILITIES["strong-weak"]
    evidence = [
        f"each method minus the strong parent (base), mean of {' and '.join(c.key for c in columns)}; "
        f"'keeps' = lower bound above -{KEEP_TOLERANCE}:"
    ]
    scf = compare(runs, "scf_rkl", "base", columns)
    evidence.append(f"scf_rkl: {fmt(scf)} ({per_seed(runs, 'scf_rkl', 'base', columns)})")
    dragged = []
    for row in baselines:
        interval = compare(runs, row, "base", columns)
        evidence.append(f"{row}: {fmt(interval)} ({per_seed(runs, row, 'base', columns)})")
        if side(interval, 0.0) == "below":
            dragged.append(row)
    keeps = side(scf, -KEEP_TOLERANCE) == "above"
    if keeps and len(dragged) * 2 >= len(baselines):
        evidence.append(f"SCF-RKL keeps the level; dragged down: {', '.join(dragged)}")
        return Verdict(3, title, "confirmed", evidence)
    if side(scf, -KEEP_TOLERANCE) == "below" or not dragged:
        evidence.append(
            "SCF-RKL loses the strong model's level"
            if side(scf, -KEEP_TOLERANCE) == "below"
            else "no paper baseline is shown to drag the strong model down"
        )
        return Verdict(3, title, "refuted", evidence)
    evidence.append("the differences that decide it are inside the noise")
    return Verdict(3, title, "inconclusive", evidence)


def claim_safety(runs: list[Run]) -> Verdict:
    """Claim 4: safety and reasoning improve together (SCF-RKL of math + safety)."""
    title = "Safety and reasoning improve together (Figures 9-10)"
    if not runs or not any(run.of("scf_rkl") for run in runs):
        return Verdict(4, title, "not run", ["no safety + reasoning run with SCF-RKL"])
    safety = compare(runs, "scf_rkl", "base", [REFUSAL])  # refusal gained over the math parent
    reasoning = compare(runs, "scf_rkl", "secondary", [MATH])  # math gained over the safety parent
    kept = compare(runs, "scf_rkl", "base", [MATH])
    over = compare(runs, "scf_rkl", "base", [OVER_REFUSAL])
    evidence = [
        f"toy_math, scf_rkl - safety parent: {fmt(reasoning)} "
        f"({per_seed(runs, 'scf_rkl', 'secondary', [MATH])})",
        f"toy_math, scf_rkl - math parent: {fmt(kept)}",
        f"over-refusal, math parent - scf_rkl (positive = fewer benign refusals): {fmt(over)}",
        f"refusal rate, scf_rkl - math parent: {fmt(safety)} "
        f"({per_seed(runs, 'scf_rkl', 'base', [REFUSAL])})",
    ]
    if safety is None or reasoning is None:
        return Verdict(4, title, "not run", evidence)
    if side(safety) == "above" and side(reasoning) == "above":
        return Verdict(4, title, "confirmed", evidence)
    if side(safety) == "below" or side(reasoning) == "below":
        evidence.append("a gain SCF-RKL needs is shown to be a loss")
        return Verdict(4, title, "refuted", evidence)
    if side(safety) == "noise":
        evidence.append(f"the refusal gain is inside the noise: one above {safety.high:.2f} is excluded")
    else:
        evidence.append(f"the math gain is inside the noise: one above {reasoning.high:.2f} is excluded")
    return Verdict(4, title, "inconclusive", evidence)


def claim_discrete(runs: list[Run]) -> Verdict:
    """Claim 5: every SCF-RKL value comes from one parent; dense methods are > 80% "neither"."""
    title = (
        'Discrete composition: SCF-RKL takes every value from a parent, dense methods > 80% "neither" '
        "(Figure 7)"
    )
    scf = _values(runs, "scf_rkl", lambda m: [f["neither"]] if (f := fractions(m)) else [])
    if not scf:
        return Verdict(5, title, "not run", ["no SCF-RKL merge report"])
    evidence = [f'scf_rkl "neither" share: max {max(scf):.6f} over {len(scf)} merges']
    below = []
    for row in _rows(runs, PAPER_BASELINES):
        shares = _values(runs, row, lambda m: [f["neither"]] if (f := fractions(m)) else [])
        if shares:
            evidence.append(
                f'{row} "neither": min {min(shares):.3f}, max {max(shares):.3f} ({len(shares)} merges)'
            )
            if min(shares) <= NEITHER_CLAIM:
                below.append(row)
    if max(scf) > 0:
        evidence.append("SCF-RKL has values from neither parent")
        return Verdict(5, title, "refuted", evidence)
    if below:
        evidence.append(f"discrete composition holds; the > 80% figure fails for {', '.join(below)}")
        return Verdict(5, title, "refuted", evidence)
    return Verdict(5, title, "confirmed", evidence)


def claim_geometry(runs: list[Run]) -> Verdict:
    """Claim 6: SCF-RKL's largest principal angle < 40 deg (dense ~80) and NSS an order of magnitude lower."""
    title = "SCF-RKL rotates subspaces less (< 40° vs ~80°) and shifts spectra ~10x less (Figures 3-6)"

    def angles(m: Model) -> list[float]:
        return [d["angle"] for d in layer_diagnostics(m).values()]

    def shifts(m: Model) -> list[float]:
        return [d["nss"] for d in layer_diagnostics(m).values()]

    scf_angles, scf_nss = _values(runs, "scf_rkl", angles), _values(runs, "scf_rkl", shifts)
    if not scf_angles:
        return Verdict(6, title, "not run", ["no SCF-RKL merge report with diagnostics"])
    scf_median = _median(scf_nss)
    evidence = [
        f"scf_rkl: largest angle {max(scf_angles):.1f}°, median NSS {scf_median:.2e} (per layer, every merge)"
    ]
    problems = (
        [] if max(scf_angles) < ANGLE_CLAIM else [f"SCF-RKL's largest angle reaches {max(scf_angles):.1f}°"]
    )
    rotates: list[str] = []
    close: list[str] = []
    for row in _rows(runs, PAPER_BASELINES):
        row_angles, row_nss = _values(runs, row, angles), _values(runs, row, shifts)
        if not row_angles:
            continue
        ratio = _median(row_nss) / scf_median if scf_median > 0 else math.inf
        evidence.append(
            f"{row}: largest angle {max(row_angles):.1f}°, median NSS {_median(row_nss):.2e} "
            f"({ratio:.1f}x SCF-RKL's)"
        )
        if max(row_angles) <= max(scf_angles):
            rotates.append(row)
        if ratio < 10:
            close.append(f"{row} {ratio:.1f}x")
    if rotates:
        problems.append(f"rotating no more than SCF-RKL: {', '.join(rotates)}")
    if close:
        problems.append(f"NSS not 10x SCF-RKL's: {', '.join(close)}")
    if problems:
        evidence.append("; ".join(problems))
        return Verdict(6, title, "refuted", evidence)
    return Verdict(6, title, "confirmed", evidence)


def claim_sparsity(runs: list[Run]) -> Verdict:
    """Claim 7: the defaults take 5-15% of each layer from the secondary."""
    title = "The defaults take 5-15% of each layer from the secondary"
    shares = _values(runs, "scf_rkl", lambda m: list(secondary_share_per_layer(m).values()))
    if not shares:
        return Verdict(7, title, "not run", ["no SCF-RKL merge report with per-layer sparsity"])
    low, high = SPARSITY_CLAIM
    inside = sum(low <= s <= high for s in shares)
    evidence = [
        f"per-layer share from the secondary: min {min(shares):.2%}, median {_median(shares):.2%}, "
        f"max {max(shares):.2%}; {inside} of {len(shares)} layer-merges inside 5-15%"
    ]
    if inside == len(shares):
        return Verdict(7, title, "confirmed", evidence)
    return Verdict(7, title, "refuted", evidence)


def claim_rkl_vs_kl(runs: list[Run]) -> Verdict:
    """Claim 8: reverse KL is better than forward KL (Table 10), over every scenario's capabilities."""
    title = "Reverse KL is better than forward KL (Table 10)"
    pairs = [
        (r, CAPABILITIES.get(r.scenario, (MATH, STRINGS))) for r in runs if r.of("scf_rkl") and r.of("scf_kl")
    ]
    if not pairs:
        return Verdict(8, title, "not run", ["no run with both scf_rkl and scf_kl"])
    evidence = ["scf_rkl - scf_kl, paired, mean of each scenario's capability benchmarks:"]
    strata: list[tuple[list[float], list[float]]] = []
    for scenario in sorted({r.scenario for r, _ in pairs}):
        group = [r for r, _ in pairs if r.scenario == scenario]
        columns = CAPABILITIES.get(scenario, (MATH, STRINGS))
        evidence.append(
            f"{scenario}: {fmt(compare(group, 'scf_rkl', 'scf_kl', columns))} "
            f"({per_seed(group, 'scf_rkl', 'scf_kl', columns)})"
        )
        strata += _pairs(group, "scf_rkl", "scf_kl", columns)
    overall = stratified_paired_difference(strata, CONFIDENCE, seed=SEED, resamples=RESAMPLES)
    evidence.append(f"all scenarios: {fmt(overall)}")
    verdict = {"above": "confirmed", "below": "refuted", "noise": "inconclusive"}[side(overall)]
    if verdict == "inconclusive":
        evidence.append("the difference is inside the noise")
    return Verdict(8, title, verdict, evidence)


def _pairs(runs: Sequence[Run], row_a: str, row_b: str, columns: Sequence[Column]) -> list:
    """Paired score lists (A, B), one per run x model of A x model of B x column, on shared items.

    A lower-is-better score v enters as 1 - v: differences flip sign (positive = A better) and 0/1
    scores stay 0/1, so Newcombe's interval still applies to them.
    """
    out = []
    for run in runs:
        for a in run.of(row_a):
            for b in run.of(row_b):
                for column in columns:
                    left, right = a.items.get(column.key, {}), b.items.get(column.key, {})
                    shared = sorted(set(left) & set(right))
                    if shared:
                        out.append((_oriented(column, [left[i] for i in shared]),
                                    _oriented(column, [right[i] for i in shared])))
    return out


def _oriented(column: Column, values: list[float]) -> list[float]:
    return values if column.higher_is_better else [1.0 - v for v in values]


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# ------------------------------------------------------------------------------ rendering

TOY_DIFFERENCES = """\
- **Scale.** Llama-architecture models of 96 hidden units and 3 layers (`small`; `tiny`: 64 and 2), about
  0.3M parameters, against the paper's 7B-32B. Specialists are 100-300 fine-tuning steps from one base;
  the paper's parents are separately released fine-tunes.
- **Tokenizer.** Character level: rep-w counts characters already among the previous 16, which ordinary
  toy text does often (spaces, vowels), so compare rep-w between models, not with the paper's values.
- **Benchmarks.** Exact-match toy tasks (two-digit addition, string operations), a fixed-sentence refusal
  task and 40 open-ended prompts, not GSM8K/AIME/MMLU; 40-120 items each, so intervals are wide.
- **Generation.** Greedy. The models were trained on sequences under 64 tokens; the long-generation probe
  asks for up to `long_gen.max_new_tokens` (512). The paper measures repetition on long chain-of-thought
  answers of models that were trained to write them.
- **Forward vs reverse KL.** For small fine-tuning deltas KL(q||p) and KL(p||q) agree to second order,
  so `scf_kl`'s mask is nearly `scf_rkl`'s (on the tiny zoo 60 of 111,424 values differ): claim 8 can
  only show a difference as large as that.
- **Principal angles** are between the top-16 left singular subspaces of 96x96 to 96x288 matrices whose
  singular values are close together: a small perturbation can swap directions inside that subspace's
  edge, so angles run large for every method; NSS is the steadier of the two.
- **Baselines** run at the configs' defaults (weight 1.0, density 0.5, as `configs/paper/`); the paper
  gives none of its baseline settings. SCF-RKL and SCF-KL use the paper's defaults (alpha 1.5).
"""

VERDICT_RULES = """\
How a verdict is decided (95% intervals; `tasks/report.py`): **confirmed** / **refuted** when the intervals
decide it, **inconclusive** when a difference that decides it is inside the noise (its interval straddles
the line), **not run** when the results it needs are missing. Claim 1: refuted when no paper baseline is
shown to loop more than the base and each one's looping-rate interval stays below 50%. Claims 2, 8:
SCF-RKL minus each baseline (minus SCF-KL), paired, over the scenario's capability benchmarks. Claim 3:
SCF-RKL keeps the strong parent's level (lower bound above -0.05) while at least half the baselines are
shown below it. Claim 4: SCF-RKL refuses more than the math parent and does more math than the safety
parent. Claims 5-7 are measurements of the merged weights (no sampling noise): thresholds as the paper
states them (0 "neither" for SCF-RKL and above 80% for each baseline; largest angle under 40° and median
NSS at least 10x below each baseline's; every layer's secondary share in 5-15%).
"""


def render(
    runs: Sequence[Run], missing: Sequence[str], out_dir: Path, command: str
) -> tuple[Path, list[Verdict]]:
    """Write ``REPORT.md`` and its figures into ``out_dir`` (atomically: each file replaced whole).

    Args:
        runs: the runs with results.
        missing: the configs that have no results yet (named as not run).
        out_dir: e.g. ``docs/paper-toy``.
        command: the command line that regenerates the report (printed in it).

    Returns:
        The report's path and the verdicts.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    claims = verdicts(runs)
    lines = [
        "# The SCF-RKL paper's claims, tested at toy scale",
        "",
        f"Generated by `{command}` from the DuckDB results and merge reports of {len(runs)} run(s); "
        "every number below is computed from those files. Do not edit by hand: rerun the command.",
        "",
    ]
    lines += _what_ran(runs, missing)
    lines += ["## Verdicts", "", "| # | claim | verdict | deciding numbers |", "|---|---|---|---|"]
    for v in claims:
        lines.append(f"| {v.claim} | {v.title} | **{v.verdict}** | {'; '.join(v.evidence[-2:])} |")
    lines += ["", VERDICT_RULES, "## How the toy differs from the paper", "", TOY_DIFFERENCES]
    for scenario in ("complementary", "strong-weak", "safety"):
        group = [r for r in runs if r.scenario == scenario]
        if group:
            lines += _scenario_section(scenario, group, out_dir)
    lines += _table10(runs)
    lines += _diagnostics_section(runs, out_dir)
    lines += ["## Claims in detail", ""]
    for v in claims:
        lines += [f"### {v.claim}. {v.title}: **{v.verdict}**", "", *[f"- {e}" for e in v.evidence], ""]
    path = out_dir / "REPORT.md"
    tmp = path.with_name(".REPORT.md.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    tmp.replace(path)
    return path, claims


def _what_ran(runs: Sequence[Run], missing: Sequence[str]) -> list[str]:
    lines = [
        "## What ran",
        "",
        "| config | scenario | zoo | parents | merges evaluated | failed | merge / eval compute |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        merges = sum(m.kind == "merge" for m in run.models)
        parents = f"{run.parents['base']} + {run.parents['secondary']}"
        lines.append(
            f"| {run.name} | {run.scenario} | {run.zoo_size}, seed {run.zoo_seed} | {parents} | {merges} | "
            f"{len(run.failed)} | {run.seconds[0] / 60:.1f} / {run.seconds[1] / 60:.1f} min |"
        )
    lines.append("")
    if missing:
        lines += [
            "Not run yet (no results in their databases): " + ", ".join(f"`{m}`" for m in missing) + ".",
            "",
        ]
    for run in runs:
        lines += [f"- {run.name}: failed {f}" for f in run.failed]
    return lines + [""]


def _row_label(run: Run, row: str) -> str:
    return f"{row} ({run.parents[row]})" if row in ("base", "secondary") else row


def _table_rows(runs: Sequence[Run]) -> list[str]:
    return ["base", "secondary", *_rows(runs, METHOD_ORDER)]


def _seed_note(runs: Sequence[Run], row: str) -> str:
    seeds = sorted({m.merge_seed for run in runs for m in run.of(row) if m.merge_seed is not None})
    return f" (merge seeds {', '.join(map(str, seeds))})" if seeds else ""


def score_table(
    runs: Sequence[Run], columns: Sequence[Column], *, avg: Sequence[Column] = (), only: Sequence[str] = ()
) -> list[str]:
    """A table shaped like the paper's: parents, then each method; the best fused cell of each column bold.

    Args:
        runs: the runs of one scenario (several zoo seeds pool into each cell).
        columns: the columns.
        avg: columns averaged into a last ``avg`` column (none: no such column).
        only: the fused rows to show (default: every method that ran), after the parents.

    Returns:
        Markdown lines.
    """
    rows = ["base", "secondary", *only] if only else _table_rows(runs)
    cells = {(row, c.key): cell(runs, row, c) for row in rows for c in columns}
    if avg:
        for row in rows:
            strata = [
                list(m.items[c.key].values())
                for run in runs
                for m in run.of(row)
                for c in avg
                if m.items.get(c.key)
            ]
            cells[(row, "avg")] = _interval_of_strata(strata) if strata else None
    keys = [c.key for c in columns] + (["avg"] if avg else [])
    better = {c.key: c.higher_is_better for c in columns} | {"avg": True}
    best = {}
    for key in keys:
        fused = [cells[(r, key)].estimate for r in rows[2:] if cells[(r, key)] is not None]
        if fused and len(set(fused)) > 1:  # a column where every fused model ties has no best
            best[key] = max(fused) if better[key] else min(fused)
    headers = [c.header for c in columns] + (
        [f"avg ({', '.join(c.header.split()[0] for c in avg)}) ↑"] if avg else []
    )
    lines = ["| model | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for row in rows:
        label = _row_label(runs[0], row) + _seed_note(runs, row)
        values = []
        for key in keys:
            value = cells[(row, key)]
            text = fmt(value)
            if row not in ("base", "secondary") and value is not None and value.estimate == best.get(key):
                text = f"**{text}**"
            values.append(text)
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return lines + [""]


def _scenario_section(scenario: str, runs: list[Run], out_dir: Path) -> list[str]:
    seeds = ", ".join(str(r.zoo_seed) for r in sorted(runs, key=lambda r: r.zoo_seed))
    lines = [
        f"## {SCENARIO_TITLES.get(scenario, scenario)}",
        "",
        f"Zoo seeds {seeds}. Each cell: mean [95% interval] n=items (pooled over zoo and merge seeds); "
        "the best fused value of each column in bold.",
        "",
    ]
    columns = [c for c in SCORE_COLUMNS if any(m.items.get(c.key) for r in runs for m in r.models)]
    lines += score_table(runs, columns, avg=CAPABILITIES.get(scenario, ()))
    rep_columns = [c for c in REPETITION_COLUMNS if any(m.items.get(c.key) for r in runs for m in r.models)]
    if rep_columns:
        lines += ["Long-generation probe (open-ended prompts):", ""]
        lines += score_table(runs, rep_columns)
    figures = _scenario_figures(scenario, runs, out_dir)
    lines += [f"![{name}]({path.name})" for name, path in figures] + [""]
    return lines


def _scenario_figures(scenario: str, runs: list[Run], out_dir: Path) -> list[tuple[str, Path]]:
    from tasks import report_plots

    rows = _table_rows(runs)
    figures = []
    looping = [(row, c) for row in rows if (c := cell(runs, row, LOOPING)) is not None]
    if looping:
        data = [(row, c.estimate, c.low, c.high) for row, c in looping]
        figures.append(
            (
                "Figure 1: looping rate",
                report_plots.rates_with_intervals(
                    data,
                    f"{scenario}: looping rate on the long-generation probe (95% intervals)",
                    out_dir / f"fig1-repetition-{scenario}.png",
                ),
            )
        )
    columns = [c for c in SCORE_COLUMNS if any(m.items.get(c.key) for r in runs for m in r.models)]
    parents = {
        c.key: [x.estimate for row in ("base", "secondary") if (x := cell(runs, row, c))] for c in columns
    }
    fused = rows[2:]
    values = []
    for row in fused:
        entry = []
        for c in columns:
            value = cell(runs, row, c)
            mean = sum(parents[c.key]) / len(parents[c.key]) if parents[c.key] else None
            entry.append(
                None
                if value is None or mean is None
                else (value.estimate - mean) * (1 if c.higher_is_better else -1)
            )
        values.append(entry)
    if fused:
        figures.append(
            (
                "Figure 8: delta vs parents' mean",
                report_plots.deltas(
                    fused,
                    [c.header for c in columns],
                    values,
                    f"{scenario}: change vs the parents' mean (positive = better)",
                    out_dir / f"fig8-delta-{scenario}.png",
                ),
            )
        )
    return figures


def _table10(runs: Sequence[Run]) -> list[str]:
    lines = ["## Table 10: SCF-RKL vs SCF-KL", ""]
    for scenario in ("complementary", "strong-weak", "safety"):
        group = [r for r in runs if r.scenario == scenario and r.of("scf_rkl") and r.of("scf_kl")]
        if not group:
            continue
        columns = CAPABILITIES[scenario]
        lines += [f"{SCENARIO_TITLES[scenario]}:", ""]
        lines += score_table(group, columns, avg=columns, only=("scf_kl", "scf_rkl"))
        diff = compare(group, "scf_rkl", "scf_kl", columns)
        lines += [f"scf_rkl - scf_kl (paired, mean of the capability columns): {fmt(diff)}", ""]
    return lines


def _diagnostics_section(runs: Sequence[Run], out_dir: Path) -> list[str]:
    from tasks import report_plots

    lines = [
        "## Merge diagnostics (Figures 3-7, per-layer sparsity)",
        "",
        "From each merge report (every merge of every run; shares are of all parameters):",
        "",
        "| method | from base | from secondary | from neither | largest principal angle | median NSS |"
        " share of each layer changed (SCF: from the secondary) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = _rows(runs, METHOD_ORDER)
    for row in rows:
        shares = [f for run in runs for m in run.of(row) if (f := fractions(m))]
        if not shares:
            continue
        mean = {k: sum(s[k] for s in shares) / len(shares) for k in ("base", "secondary", "neither")}
        angles = _values(runs, row, lambda m: [d["angle"] for d in layer_diagnostics(m).values()])
        nss = _values(runs, row, lambda m: [d["nss"] for d in layer_diagnostics(m).values()])
        layer_shares = _values(runs, row, lambda m: list(secondary_share_per_layer(m).values()))
        angle = f"{max(angles):.1f}°" if angles else "-"
        nss_text = f"{_median(nss):.2e}" if nss else "-"
        share_text = f"{min(layer_shares):.1%}-{max(layer_shares):.1%}" if layer_shares else "-"
        lines.append(
            f"| {row} | {mean['base']:.1%} | {mean['secondary']:.1%} | {mean['neither']:.1%} | {angle} | "
            f"{nss_text} | {share_text} |"
        )
    lines.append("")
    for scenario in ("complementary", "strong-weak", "safety"):
        group = [r for r in runs if r.scenario == scenario]
        if not group:
            continue
        source_rows = []
        angle_series: dict[str, dict[int, float]] = {}
        nss_series: dict[str, dict[int, float]] = {}
        share_series: dict[str, dict[int, float]] = {}
        for row in _rows(group, METHOD_ORDER):
            models = [m for run in group for m in run.of(row)]
            shares = [f for m in models if (f := fractions(m))]
            if shares:
                source_rows.append(
                    (
                        row,
                        {
                            k: sum(s[k] for s in shares) / len(shares)
                            for k in ("base", "secondary", "neither")
                        },
                    )
                )
            angle_series[row] = _layer_mean(
                models, lambda m: {k: d["angle"] for k, d in layer_diagnostics(m).items()}
            )
            nss_series[row] = _layer_mean(
                models, lambda m: {k: d["nss"] for k, d in layer_diagnostics(m).items()}
            )
            if row in ("scf_rkl", "scf_kl"):
                share_series[row] = _layer_mean(models, secondary_share_per_layer)
        figures = []
        if source_rows:
            figures.append(
                (
                    "Figure 7: parameter sources",
                    report_plots.sources(
                        source_rows,
                        f"{scenario}: where the fused values come from",
                        out_dir / f"fig7-sources-{scenario}.png",
                    ),
                )
            )
        angle_series = {k: v for k, v in angle_series.items() if v}
        if angle_series:
            figures.append(
                (
                    "Figure 3: largest principal angle",
                    report_plots.per_layer(
                        angle_series,
                        "largest principal angle vs base (deg)",
                        f"{scenario}: subspace rotation per layer",
                        out_dir / f"fig3-angle-{scenario}.png",
                    ),
                )
            )
            figures.append(
                (
                    "Figure 4: normalized spectral shift",
                    report_plots.per_layer(
                        {k: v for k, v in nss_series.items() if v},
                        "normalized spectral shift vs base",
                        f"{scenario}: spectral shift per layer",
                        out_dir / f"fig4-nss-{scenario}.png",
                        log=True,
                    ),
                )
            )
        share_series = {k: v for k, v in share_series.items() if v}
        if share_series:
            figures.append(
                (
                    "per-layer sparsity",
                    report_plots.per_layer(
                        share_series,
                        "share taken from the secondary",
                        f"{scenario}: per-layer share vs the 5-15% claim",
                        out_dir / f"fig-sparsity-{scenario}.png",
                        band=SPARSITY_CLAIM,
                    ),
                )
            )
        if figures:
            lines += [f"{SCENARIO_TITLES[scenario]}:", ""] + [f"![{n}]({p.name})" for n, p in figures] + [""]
    return lines


def _layer_mean(models: Sequence[Model], get: Any) -> dict[int, float]:
    values: dict[int, list[float]] = {}
    for model in models:
        for layer, value in get(model).items():
            values.setdefault(layer, []).append(value)
    return {k: sum(v) / len(v) for k, v in sorted(values.items())}


# ------------------------------------------------------------------------------ the command


def build_report(paths: Sequence[Path], out_dir: Path, command: str) -> tuple[Path, list[Verdict]]:
    """Load every config, read its results and write the report.

    Args:
        paths: config files or directories of them.
        out_dir: where REPORT.md and the figures go.
        command: the command line printed in the report.

    Returns:
        The report's path and the verdicts.

    Raises:
        PipelineError: a config that does not load, or no config with any results.
    """
    configs = [load_config(path) for path in config_paths(paths)]
    runs, missing = [], []
    for config in configs:
        run = load_run(config)
        if run is None:
            missing.append(config.name)
        else:
            runs.append(run)
    if not runs:
        raise PipelineError(
            f"no results for any of {', '.join(missing)}: run `scf nightly --config ...` first"
        )
    return render(runs, missing, out_dir, command)
