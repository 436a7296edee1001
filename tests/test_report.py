"""`scf report`: tables, figures and the eight verdicts from a real DuckDB file and real merge reports.

Per-item scores are seeded through `tasks.results_db` (known values, so every verdict and cell is
checked exactly); the merge reports are those of real merges of the tiny zoo with diagnostics on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from scf.merge import merge
from scf.spec import MergeSpec
from tasks import report as rep
from tasks import results_db
from tasks.config import load_config
from tasks.stats import newcombe_interval, proportion_interval, stratified_paired_difference

N = 40  # items per benchmark
# model label -> (math right, strings right, looping) counts out of N; the first k items are the hits.
MODELS = {
    "base=math": (40, 0, 0),
    "secondary_0=strings": (12, 40, 0),
    "scf_rkl": (40, 30, 0),
    "scf_kl": (40, 20, 0),
    "task_arithmetic": (20, 10, 40),
    "ties": (20, 20, 20),
}
METHOD_PARAMS = {"scf_rkl": {}, "scf_kl": {}, "task_arithmetic": {"weight": 1.0}, "ties": {"weight": 1.0}}


def _items(prefix: str, hits: int) -> dict[str, float]:
    return {f"{i:02d}-{prefix}": float(i < hits) for i in range(N)}


def _write_config(tmp_path: Path, name: str, secondary: str = "zoo:strings") -> Path:
    config = {
        "name": name,
        "zoo": {"size": "tiny", "seed": 0},
        "sources": {"base": "zoo:math", "secondary": [secondary], "reference": "zoo:base"},
        "candidates": [{"method": m, "params": p} for m, p in METHOD_PARAMS.items()],
        "merge": {"device": "cpu", "diagnostics": True},
        "eval": {"suite": "toy_long", "device": "cpu"},
        "gate": {"benchmarks": {"toy_math.exact_match": {"tolerance": 0.6}}},
        "storage": {"workdir": str(tmp_path / name)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def merge_reports(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Real merge reports (diagnostics on) of math + strings by each method, on the tiny zoo."""
    root = tmp_path_factory.mktemp("report-merges")
    out = {}
    for method in (
        "scf_rkl",
        "task_arithmetic",
        "ties",
    ):  # scf_kl reuses scf_rkl's report (a second merge costs)
        spec = MergeSpec(
            base=str(tiny_zoo / "math"),
            secondary=[str(tiny_zoo / "strings")],
            reference=str(tiny_zoo / "base"),
            method=method,
            params=METHOD_PARAMS[method],
            device="cpu",
            diagnostics=True,
        )
        out[method] = merge(spec, root / method, progress=False)
    out["scf_kl"] = out["scf_rkl"]
    return out


def _seed_results(config_path: Path, merge_reports: dict[str, dict]) -> None:
    """Write the known per-item scores of MODELS into the config's DuckDB, and its merge reports."""
    config = load_config(config_path)
    source = results_db.Source(role="base", ref="zoo:math", revision=None, fingerprint="f" * 64)
    for label, (math_hits, strings_hits, loops) in MODELS.items():
        kind = "parent" if "=" in label else "merge"
        record = results_db.ModelRecord(
            id=f"id-{label.split('=')[0]}",
            kind=kind,
            label=label,
            method=None if kind == "parent" else label,
            sources=[source],
        )
        samples = []
        for benchmark, metric, hits in (
            ("toy_math", "exact_match", math_hits),
            ("toy_strings", "exact_match", strings_hits),
            ("toy_long", "looping", loops),
        ):
            for item, score in _items(benchmark, hits).items():
                samples.append(
                    results_db.SampleRow(
                        benchmark=benchmark,
                        metric=metric,
                        item_id=item,
                        score=score,
                        looping=None,
                        seq_rep_4=None,
                        truncated=None,
                        n_tokens=1,
                    )
                )
        stats = results_db.GenerationStats(
            repetition_rate=0, mean_seq_rep_4=0, truncation_rate=0, n_generations=0, eval_seconds=0
        )
        results_db.write_model_results(config.duckdb_path, config.name, record, [], stats, samples=samples)
        if kind == "merge":
            folder = config.workdir / "artifacts" / record.id
            folder.mkdir(parents=True)
            (folder / "merge_report.json").write_text(json.dumps(merge_reports[label]))


@pytest.fixture(scope="module")
def built(merge_reports: dict[str, dict], tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("report")
    configs = tmp / "configs"
    configs.mkdir()
    _seed_results(_write_config(configs, "toy-complementary"), merge_reports)
    _write_config(configs, "toy-strong-weak", secondary="zoo:weak")  # never run: no database
    out = tmp / "out"
    code = main(["report", "--config", str(configs), "--out", str(out)])
    assert code == 0
    return out, (out / "REPORT.md").read_text()


def test_every_figure_is_written_and_linked(built):
    out, text = built
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(
        f"{name}-complementary.png"
        for name in (
            "fig1-repetition",
            "fig8-delta",
            "fig7-sources",
            "fig3-angle",
            "fig4-nss",
            "fig-sparsity",
        )
    )
    assert all(f"]({name})" in text for name in pngs)
    assert all((out / name).read_bytes().startswith(b"\x89PNG") for name in pngs)


def test_the_table_cells_come_from_the_database(built):
    _, text = built
    rows = {
        line.split(" | ")[0].lstrip("| "): line
        for line in text.splitlines()
        if line.startswith("| ") and "math ↑" not in text.splitlines()[0]
    }
    table = text.split("| model | math ↑ | strings ↑ | avg (math, strings) ↑ |")[1].split("\n\n")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    assert [line.split(" | ")[0] for line in lines] == [
        "| base (math)",
        "| secondary (strings)",
        "| scf_rkl",
        "| scf_kl",
        "| task_arithmetic",
        "| ties",
    ]
    scf = lines[2]
    # math 40/40 and strings 30/40: Wilson intervals of one run of 0/1 scores
    assert f"{proportion_interval(40, N).format()} n=40" in scf
    assert f"**{proportion_interval(30, N).format()} n=40**" in scf  # the best fused strings score, bold
    avg = proportion_interval(40 + 30, 2 * N)  # equal-sized 0/1 benchmarks: the pooled share
    assert f"**{avg.format()} n=80**" in scf
    assert "**" not in lines[0] and "**" not in lines[1]  # parents are never bolded
    assert rows  # the report has tables at all
    assert "Not run yet (no results in their databases): `toy-strong-weak`." in text


def test_the_verdicts_follow_the_rules_on_known_inputs(built):
    _, text = built
    verdicts = dict(re.findall(r"^\| (\d) \| .*? \| \*\*(.+?)\*\* \|", text, flags=re.MULTILINE))
    # 1: TA loops on 40/40 and ties on 20/40 against 0/40 for base and SCF-RKL
    # 2: SCF-RKL beats both baselines on math and strings; 3, 4: scenarios not run
    # 8: SCF-RKL 30/40 strings vs SCF-KL 20/40, equal math: +0.125, interval above 0
    assert verdicts["1"] == "confirmed" and verdicts["2"] == "confirmed" and verdicts["8"] == "confirmed"
    assert verdicts["3"] == "not run" and verdicts["4"] == "not run"
    assert verdicts["5"] in ("confirmed", "refuted")  # measured on the real merges, checked below
    rise = newcombe_interval(0, 40, 0, 0)  # task_arithmetic loops on every item, base on none
    assert f"task_arithmetic - base: {rise.format(3)} n=40" in text
    kl = stratified_paired_difference(
        [([1.0] * 40, [1.0] * 40), (list(_items("s", 30).values()), list(_items("s", 20).values()))]
    )
    assert f"all scenarios: {kl.format()} n=80" in text


def test_merge_diagnostics_are_read_from_the_merge_reports(built, merge_reports):
    _, text = built
    scf = merge_reports["scf_rkl"]
    assert scf["totals"]["fraction_from"].get("neither", 0.0) == 0.0  # discrete composition, measured
    share = 1 - scf["diagnostics"]["per_layer_sparsity"]["0"]
    assert f"{share:.2%}" in text or f"{share:.1%}" in text
    ta_neither = merge_reports["task_arithmetic"]["totals"]["fraction_from"]["neither"]
    assert re.search(rf"\| task_arithmetic \| [0-9.]+% \| [0-9.]+% \| {ta_neither:.1%} \|", text)
    expected = (
        "confirmed"
        if ta_neither > 0.8 and merge_reports["ties"]["totals"]["fraction_from"]["neither"] > 0.8
        else "refuted"
    )
    assert re.search(rf"### 5\. .*: \*\*{expected}\*\*", text)


def _run(rows: dict[str, list[dict[str, dict[str, float]]]], scenario: str = "complementary", seed: int = 0):
    run = rep.Run(f"r{seed}", scenario, seed, "tiny", {"base": "math", "secondary": "x"})
    for row, models in rows.items():
        for k, items in enumerate(models):
            run.models.append(
                rep.Model(
                    f"{row}{k}",
                    "parent" if row in ("base", "secondary") else "merge",
                    row,
                    row,
                    k if len(models) > 1 else None,
                    items,
                )
            )
    return run


def _looping(hits: int) -> dict[str, dict[str, float]]:
    return {"toy_long.looping": _items("l", hits)}


def test_claim_1_refuted_when_no_merge_loops_and_inconclusive_inside_the_noise():
    quiet = _run(
        {"base": [_looping(0)], "scf_rkl": [_looping(0)], "ties": [_looping(0)], "sce": [_looping(1)]}
    )
    verdict = rep.claim_repetition([quiet])
    assert verdict.verdict == "refuted" and "below 50% with 95% confidence" in verdict.evidence[-1]
    noisy = _run(
        {
            "base": [_looping(0)],
            "scf_rkl": [_looping(0)],
            "ties": [_looping(3)],
            "sce": [_looping(30)],
            "dare_ties": [_looping(2)],
        }
    )
    assert rep.claim_repetition([noisy]).verdict == "inconclusive"  # 1 of 3 amplifies; 2 inside the noise
    half = _run(
        {"base": [_looping(0)], "scf_rkl": [_looping(0)], "ties": [_looping(3)], "sce": [_looping(30)]}
    )
    assert rep.claim_repetition([half]).verdict == "confirmed"  # half the baselines amplify, SCF-RKL less
    seeds = _run({"base": [_looping(0)], "scf_rkl": [_looping(0)], "ties": [_looping(30), _looping(40)]})
    assert rep.claim_repetition([seeds]).verdict == "confirmed"  # both merge seeds of ties loop


def test_claim_3_needs_scf_to_keep_the_strong_level_and_baselines_to_drag_it_down():
    def m(hits: int) -> dict[str, dict[str, float]]:
        return {"toy_math.exact_match": _items("m", hits), "toy_strings.exact_match": _items("s", hits)}

    keeps = _run({"base": [m(40)], "secondary": [m(5)], "scf_rkl": [m(40)], "ties": [m(10)]}, "strong-weak")
    assert rep.claim_strong_weak([keeps]).verdict == "confirmed"
    loses = _run({"base": [m(40)], "secondary": [m(5)], "scf_rkl": [m(20)], "ties": [m(10)]}, "strong-weak")
    assert rep.claim_strong_weak([loses]).verdict == "refuted"
    nobody = _run({"base": [m(40)], "secondary": [m(5)], "scf_rkl": [m(40)], "ties": [m(40)]}, "strong-weak")
    verdict = rep.claim_strong_weak([nobody])
    assert (
        verdict.verdict == "refuted"
        and verdict.evidence[-1] == "no paper baseline is shown to drag the strong model down"
    )


def test_claim_4_and_per_seed_estimates():
    def m(math: int, refusals: int) -> dict[str, dict[str, float]]:
        return {"toy_math.exact_match": _items("m", math), "toy_safety.refusal_rate": _items("h", refusals)}

    runs = [
        _run({"base": [m(40, 0)], "secondary": [m(10, 40)], "scf_rkl": [m(38, 30)]}, "safety", seed)
        for seed in (0, 1)
    ]
    verdict = rep.claim_safety(runs)
    assert verdict.verdict == "confirmed"
    assert "(zoo0 +0.75, zoo1 +0.75)" in verdict.evidence[3]
    flat = [_run({"base": [m(40, 0)], "secondary": [m(10, 40)], "scf_rkl": [m(38, 0)]}, "safety")]
    assert rep.claim_safety(flat).verdict == "inconclusive"  # no refusal gained: 0.00 inside [-0.09, 0.09]


def test_a_directory_without_configs_and_no_results_are_clear_errors(tmp_path, capsys):
    assert main(["report", "--config", str(tmp_path)]) == 2
    assert "no *.yaml pipeline configs in this directory" in capsys.readouterr().err
    _write_config(tmp_path, "empty")
    assert main(["report", "--config", str(tmp_path / "empty.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "no results for any of empty: run `scf nightly --config ...` first" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
