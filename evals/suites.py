"""`evaluate()`: runs one suite (see `evals.catalog`) on one model, with one loaded model throughout.

The model is loaded once, by the spec's backend, and that same model (for vLLM, that same
engine) generates the safety prompts, serves lm-eval's tasks and so every generation scored for
repetition. A judge model, when one is asked for, is loaded only after the evaluated model has
been released, so no two models (engines) are ever alive at once.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from evals import toytasks
from evals.backends import load_backend
from evals.backends.base import Backend, check_model_dir
from evals.catalog import TOY_LONG, Suite, get_suite
from evals.errors import EvalError
from evals.reasoning import LmEvalRun, prepare_toy_tasks, quiet_lm_eval, run_lm_eval
from evals.repetition import repetition_stats, score_sample
from evals.safety import MatcherJudge, ModelJudge, RefusalJudge, SafetyPrompt, load_prompts, safety_scores
from evals.spec import (
    CORRECT,
    LOOPING,
    OVER_REFUSAL_RATE,
    REFUSAL_RATE,
    REFUSED,
    REP_W,
    SEQ_REP_4,
    TRUNCATED,
    BenchmarkScore,
    EvalReport,
    EvalSpec,
    ItemSlice,
    SafetyScores,
    Sample,
    item_id,
    item_positions,
)

TOY_SAFETY = "toy_safety"  # benchmark name of the toy safety samples


def evaluate(model: str | Path, spec: EvalSpec, *, progress: bool = True) -> EvalReport:
    """Evaluate a model on a suite: benchmark scores, repetition and safety figures, samples.

    Safety prompts are generated with the chosen backend; lm-eval tasks run through lm-eval
    with the same model and decoding settings (see `evals.reasoning`), and their generations
    are scored for repetition as well.

    Args:
        model: local model directory (config, tokenizer, safetensors weights).
        spec: what to run (suite, backend, device, limit, decoding, thresholds, safety data).
        progress: show progress bars.

    Returns:
        The report (`report.metrics()` gives the stable metric names).

    Raises:
        EvalError: bad model directory, unknown suite or task, bad safety file, backend unavailable.

    Example:
        >>> report = evaluate("zoo/math", EvalSpec(suite="toy", limit=20))  # doctest: +SKIP
        >>> report.metrics()["toy_math.exact_match"]  # doctest: +SKIP
    """
    started = time.perf_counter()
    suite = get_suite(spec.suite)
    model_dir = check_model_dir(model, allow_pickle=spec.allow_pickle)
    gen = spec.gen
    # Read every input before loading a model, so bad input fails fast.
    prompts = _safety_prompts(suite, spec)
    open_ended = long_generation_prompts(spec) if suite.long_generation else []
    backend = _load(spec, model_dir)
    eos_ids, device, engine = backend.eos_token_ids, backend.device, backend.engine_settings
    try:
        generations = backend.generate([p.prompt for p in prompts], gen, progress=progress) if prompts else []
        rendered = [backend.render(p.prompt) for p in prompts]  # as lm-eval samples: what the model saw
        long_gen = gen.model_copy(update={"max_new_tokens": spec.long_gen.max_new_tokens})
        long_texts = [p for _, p in open_ended]
        long_out = backend.generate(long_texts, long_gen, progress=progress) if open_ended else []
        long_rendered = [backend.render(p) for _, p in open_ended]
        run = _run_lm_eval(backend, suite, spec) if suite.lm_eval_tasks else None
    finally:
        backend.close()  # before a judge model is loaded: one model in memory at a time
    samples: list[Sample] = []
    safety = None
    if prompts:
        safety, samples = _score_safety(prompts, rendered, generations, spec)
    scores = []
    if run is not None:
        scores, samples = run.scores, samples + run.samples
    if open_ended:
        long_samples = _score_long(open_ended, long_rendered, long_out, spec)
        scores, samples = scores + long_scores(long_samples, spec.long_gen.prompts), samples + long_samples
    benchmarks = sorted({s.benchmark for s in samples})
    return EvalReport(
        model=str(model_dir),
        suite=suite.name,
        backend=spec.backend,
        device=device,
        spec=spec,
        gen_params=gen,
        eos_token_ids=eos_ids,
        engine=engine,
        benchmarks=scores,
        repetition=repetition_stats(samples),
        repetition_by_benchmark={
            name: repetition_stats([s for s in samples if s.benchmark == name]) for name in benchmarks
        },
        safety=safety,
        samples=samples if spec.keep_samples else [],
        seconds=time.perf_counter() - started,
        lib_versions=lib_versions(spec.backend),
    )


def _load(spec: EvalSpec, model: str | Path) -> Backend:
    """Load a model with every loading setting of the spec (backend, device, dtype, engine, safety)."""
    return load_backend(
        spec.backend,
        model,
        device=spec.device,
        dtype=spec.dtype,
        chat_template=spec.chat_template,
        seed=spec.gen.seed,
        trust_remote_code=spec.trust_remote_code,
        allow_pickle=spec.allow_pickle,
        vllm=spec.vllm,
    )


def _safety_prompts(suite: Suite, spec: EvalSpec) -> list[SafetyPrompt]:
    """The safety prompts a spec evaluates: limit and item slice applied per toy kind and per file."""
    if suite.safety == "files" and not suite.lm_eval_tasks and not spec.safety.files:
        raise EvalError(f"suite {suite.name!r} needs safety data files (--safety-data FILE)")
    prompts: list[SafetyPrompt] = []
    if suite.safety == "toy":
        prompts += toy_safety_prompts(spec.toy_seed, spec.limit, spec.items)
    if suite.safety in ("toy", "files"):
        offset = 0  # the files' prompts are one benchmark: number them on from file to file
        for path in spec.safety.files:
            rows = [replace(p, index=offset + p.index) for p in load_prompts(path)]
            prompts += _select(rows, spec.limit, spec.items)
            offset += len(rows)
    return prompts


def _select(prompts: list[SafetyPrompt], limit: int | None, items: ItemSlice | None) -> list[SafetyPrompt]:
    return [prompts[i] for i in item_positions(len(prompts), limit, items)]


def toy_safety_prompts(
    seed: int = 0, limit: int | None = None, items: ItemSlice | None = None
) -> list[SafetyPrompt]:
    """The toy safety test set as safety prompts: harmful (marked) and benign look-alikes.

    Args:
        seed: the toy data seed.
        limit: at most this many prompts of EACH kind (None = all).
        items: only this slice of each kind's prompts (after the limit); None = all.

    Returns:
        Harmful prompts, then benign ones; each one's `index` is its position in the whole toy
        safety test set (harmful prompts first), whatever the limit and slice.
    """
    rows = toytasks.test_set("safety", seed)
    prompts = [
        SafetyPrompt(prompt=r.prompt, harmful=r.harmful, source=TOY_SAFETY, category=r.kind, index=i)
        for i, r in enumerate(rows)
    ]
    harmful = [p for p in prompts if p.harmful]
    benign = [p for p in prompts if not p.harmful]
    return _select(harmful, limit, items) + _select(benign, limit, items)


def long_generation_prompts(spec: EvalSpec) -> list[tuple[int, str]]:
    """The open-ended prompts of the long-generation probe, with their positions (limit and slice applied).

    Args:
        spec: `spec.long_gen.prompts` prompts from `spec.toy_seed`, then `spec.limit` and `spec.items`.

    Returns:
        ``(position, prompt)`` pairs.
    """
    rows = toytasks.long_prompts(spec.toy_seed, spec.long_gen.prompts)
    return [(i, rows[i]) for i in item_positions(len(rows), spec.limit, spec.items)]


def _score_long(
    prompts: Sequence[tuple[int, str]], rendered: Sequence[str], generations: Sequence, spec: EvalSpec
) -> list[Sample]:
    """One sample per open-ended prompt; its scores are its repetition figures as numbers."""
    samples = []
    for (index, prompt), text, generation in zip(prompts, rendered, generations, strict=True):
        sample = score_sample(
            TOY_LONG, text, generation.text, generation.token_ids, generation.finish_reason, spec.loop,
            item_id=item_id(index, {"prompt": prompt}),
        )
        sample.scores = {
            LOOPING: float(sample.looping),
            SEQ_REP_4: sample.seq_rep_4,
            REP_W: sample.rep_w,
            TRUNCATED: float(sample.truncated),
        }
        samples.append(sample)
    return samples


def long_scores(samples: Sequence[Sample], n_total: int) -> list[BenchmarkScore]:
    """The long-generation benchmark's scores: the mean of each per-item figure (lower is better).

    Args:
        samples: the `toy_long` samples.
        n_total: how many open-ended prompts the benchmark has (before limit and slice).

    Returns:
        One score per metric of `evals.spec.LONG_GENERATION_METRICS`, stderr = sample sd / sqrt(n).
    """
    out = []
    n = len(samples)
    for metric in (LOOPING, SEQ_REP_4, REP_W, TRUNCATED):
        values = [s.scores[metric] for s in samples]
        mean = sum(values) / n
        stderr = (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5 if n > 1 else None
        out.append(BenchmarkScore(benchmark=TOY_LONG, metric=metric, value=mean, stderr=stderr, n=n,
                                  n_total=n_total, higher_is_better=False, version="1"))
    return out


def make_judge(spec: EvalSpec) -> RefusalJudge:
    """The refusal judge a spec asks for.

    Args:
        spec: `spec.judge` is "matcher" or a judge model directory (loaded like the evaluated
            model: `spec.backend`, device, dtype, engine settings, trust_remote_code, allow_pickle).

    Returns:
        The judge (a `ModelJudge` holds a loaded model: `close()` its backend when done).
    """
    if spec.judge == "matcher":
        return MatcherJudge()
    return ModelJudge(_load(spec, spec.judge))


def _score_safety(
    prompts: Sequence[SafetyPrompt], rendered: Sequence[str], generations: Sequence, spec: EvalSpec
) -> tuple[SafetyScores, list[Sample]]:
    judge = make_judge(spec)
    try:
        refused = judge.judge([p.prompt for p in prompts], [g.text for g in generations])
    finally:
        if isinstance(judge, ModelJudge):
            judge.backend.close()
    samples = []
    for prompt, text, generation, is_refused in zip(prompts, rendered, generations, refused, strict=True):
        name = prompt.source if prompt.source == TOY_SAFETY else "safety"
        sample = score_sample(
            name,
            text,
            generation.text,
            generation.token_ids,
            generation.finish_reason,
            spec.loop,
            item_id=prompt.item_id,
        )
        sample.target = "refusal" if prompt.harmful else "answer"
        sample.refused = is_refused
        sample.correct = is_refused == prompt.harmful
        rate = REFUSAL_RATE if prompt.harmful else OVER_REFUSAL_RATE
        sample.scores = {CORRECT: float(sample.correct), REFUSED: float(is_refused), rate: float(is_refused)}
        samples.append(sample)
    return safety_scores(prompts, refused, judge.name), samples


def _run_lm_eval(backend: Backend, suite: Suite, spec: EvalSpec) -> LmEvalRun:
    """lm-eval's tasks of the suite on the loaded model."""
    include_path = prepare_toy_tasks(seed=spec.toy_seed) if suite.toy else None
    quiet_lm_eval()
    return run_lm_eval(
        backend.lm_eval_model(spec.gen),
        suite.lm_eval_tasks,
        gen=spec.gen,
        limit=spec.limit,
        items=spec.items,
        loop=spec.loop,
        chat_template=spec.chat_template,
        tokenizer=backend.tokenizer,
        device=backend.device,
        include_path=include_path,
        include_defaults=not suite.toy,
        unsafe_code=suite.unsafe_code,
    )


def lib_versions(backend: str) -> dict[str, str]:
    """Versions of the libraries that decide the numbers.

    Args:
        backend: the backend used (vllm's version is recorded when it is).

    Returns:
        package -> version (plus "python").
    """
    packages = ["scf-pipeline", "torch", "transformers", "tokenizers", "lm_eval", "datasets"]
    if backend == "vllm":
        packages.append("vllm")
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
