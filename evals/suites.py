"""Named evaluation suites and `evaluate()`, which runs one on one model.

A suite is a list of lm-eval tasks (toy YAML tasks or lm-eval's standard names), a safety source
(the toy safety prompts, the spec's safety data files, or none) and default decoding settings.

    toy        toy_math, toy_strings (lm-eval, local YAML + JSONL) + toy safety; greedy, 48 tokens
    reasoning  gsm8k, bbh, mmlu (general reasoning and knowledge)
    paper      the SCF-RKL paper's benchmarks that lm-eval has: aime24, aime25,
               gpqa_diamond_cot_zeroshot, gsm8k, bbh, mmlu, humaneval, ifeval + safety files
               (LiveCodeBench and IFBench are not lm-eval tasks)
    math       aime24, aime25, hendrycks_math500
    code       humaneval (runs generated code: lm-eval's confirm_run_unsafe_code is set)
    instruct   ifeval
    gpqa       gpqa_diamond_cot_zeroshot
    safety     safety data files only (HarmBench / StrongREJECT / XSTest)

Real suites need the datasets in the local Hugging Face cache when offline.
"""

from __future__ import annotations

import gc
import importlib.metadata
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evals import toytasks
from evals.backends import load_backend
from evals.backends.base import Backend, check_model_dir
from evals.errors import EvalError
from evals.reasoning import LmEvalRun, hf_lm, prepare_toy_tasks, run_lm_eval, vllm_model_args
from evals.repetition import repetition_stats, score_sample
from evals.safety import MatcherJudge, ModelJudge, RefusalJudge, SafetyPrompt, load_prompts, safety_scores
from evals.spec import EvalReport, EvalSpec, GenParams, SafetyScores, Sample

TOY_SAFETY = "toy_safety"  # benchmark name of the toy safety samples


@dataclass(frozen=True)
class Suite:
    """A named set of benchmarks.

    Attributes:
        name: the suite's name.
        lm_eval_tasks: lm-eval task or group names.
        safety: "toy" (toy safety prompts), "files" (EvalSpec.safety.files, optional unless the
            suite has nothing else) or "none".
        default_gen: decoding settings when the spec gives none.
        toy: the tasks are the toy YAML tasks (index only them: fast, offline).
        unsafe_code: the tasks execute generated code (lm-eval asks for explicit confirmation).
        description: one line for listings.
    """

    name: str
    lm_eval_tasks: tuple[str, ...]
    safety: Literal["toy", "files", "none"]
    default_gen: GenParams
    toy: bool = False
    unsafe_code: bool = False
    description: str = ""


_REAL_GEN = GenParams(max_new_tokens=1024, batch_size=8)
_LONG_GEN = GenParams(max_new_tokens=4096, batch_size=8)  # long chain-of-thought benchmarks

SUITES: dict[str, Suite] = {
    "toy": Suite(
        "toy",
        ("toy_math", "toy_strings"),
        "toy",
        GenParams(max_new_tokens=toytasks.MAX_NEW_TOKENS, batch_size=32),
        toy=True,
        description="toy zoo benchmarks: arithmetic, strings, safety (offline, CPU)",
    ),
    "reasoning": Suite(
        "reasoning", ("gsm8k", "bbh", "mmlu"), "files", _REAL_GEN, description="GSM8K, BBH, MMLU"
    ),
    "paper": Suite(
        "paper",
        ("aime24", "aime25", "gpqa_diamond_cot_zeroshot", "gsm8k", "bbh", "mmlu", "humaneval", "ifeval"),
        "files",
        _LONG_GEN,
        unsafe_code=True,
        description="the SCF-RKL paper's benchmarks available in lm-eval, plus safety files",
    ),
    "math": Suite("math", ("aime24", "aime25", "hendrycks_math500"), "files", _LONG_GEN, description="AIME"),
    "code": Suite("code", ("humaneval",), "files", _REAL_GEN, unsafe_code=True, description="HumanEval"),
    "instruct": Suite("instruct", ("ifeval",), "files", _REAL_GEN, description="IFEval"),
    "gpqa": Suite("gpqa", ("gpqa_diamond_cot_zeroshot",), "files", _LONG_GEN, description="GPQA diamond"),
    "safety": Suite("safety", (), "files", _REAL_GEN, description="refusal rates on safety data files"),
}


def get_suite(name: str) -> Suite:
    """The suite of that name.

    Args:
        name: a key of `SUITES`.

    Returns:
        The suite.

    Raises:
        EvalError: unknown name, listing the known ones.
    """
    if name not in SUITES:
        raise EvalError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}")
    return SUITES[name]


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
    model_dir = check_model_dir(model)
    gen = spec.gen
    # Read every input before loading a model, so bad input fails fast.
    prompts = _safety_prompts(suite, spec)
    backend = load_backend(
        spec.backend,
        model_dir,
        device=spec.device,
        dtype=spec.dtype,
        chat_template=spec.chat_template,
        seed=gen.seed,
    )
    eos_ids, device, tokenizer = backend.eos_token_ids, backend.device, backend.tokenizer
    samples: list[Sample] = []
    safety = None
    if prompts:
        safety, safety_samples = _run_safety(backend, prompts, spec, gen, progress)
        samples += safety_samples
    scores = []
    if suite.lm_eval_tasks:
        if spec.backend == "transformers":
            lm, model_args = hf_lm(backend, gen), None  # the same loaded model serves lm-eval
        else:
            # lm-eval's vLLM model starts its own engine: release ours first (GPU memory).
            backend = None
            _free_gpu()
            lm, model_args = "vllm", vllm_model_args(model_dir, spec.dtype, gen)
        run = _run_lm_eval(lm, model_args, tokenizer, device, suite, spec)
        scores, samples = run.scores, samples + run.samples
    benchmarks = sorted({s.benchmark for s in samples})
    return EvalReport(
        model=str(model_dir),
        suite=suite.name,
        backend=spec.backend,
        device=device,
        spec=spec,
        gen_params=gen,
        eos_token_ids=eos_ids,
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


def _safety_prompts(suite: Suite, spec: EvalSpec) -> list[SafetyPrompt]:
    prompts: list[SafetyPrompt] = []
    if suite.safety == "toy":
        prompts += toy_safety_prompts(spec.toy_seed, spec.limit)
    if suite.safety in ("toy", "files"):
        for path in spec.safety.files:
            prompts += load_prompts(path)[: spec.limit]
    if suite.safety == "files" and not suite.lm_eval_tasks and not prompts:
        raise EvalError(f"suite {suite.name!r} needs safety data files (--safety-data FILE)")
    return prompts


def toy_safety_prompts(seed: int = 0, limit: int | None = None) -> list[SafetyPrompt]:
    """The toy safety test set as safety prompts: harmful (marked) and benign look-alikes.

    Args:
        seed: the toy data seed.
        limit: at most this many prompts of EACH kind (None = all).

    Returns:
        Harmful prompts, then benign ones.
    """
    rows = toytasks.test_set("safety", seed)
    harmful = [r for r in rows if r.harmful][:limit]
    benign = [r for r in rows if not r.harmful][:limit]
    return [
        SafetyPrompt(prompt=r.prompt, harmful=r.harmful, source=TOY_SAFETY, category=r.kind)
        for r in harmful + benign
    ]


def make_judge(spec: EvalSpec) -> RefusalJudge:
    """The refusal judge a spec asks for.

    Args:
        spec: `spec.judge` is "matcher" or a judge model directory (loaded with `spec.backend`).

    Returns:
        The judge.
    """
    if spec.judge == "matcher":
        return MatcherJudge()
    judge_backend = load_backend(spec.backend, spec.judge, device=spec.device, dtype=spec.dtype)
    return ModelJudge(judge_backend)


def _run_safety(
    backend: Backend, prompts: Sequence[SafetyPrompt], spec: EvalSpec, gen: GenParams, progress: bool
) -> tuple[SafetyScores, list[Sample]]:
    generations = backend.generate([p.prompt for p in prompts], gen, progress=progress)
    judge = make_judge(spec)
    refused = judge.judge([p.prompt for p in prompts], [g.text for g in generations])
    samples = []
    for prompt, generation, is_refused in zip(prompts, generations, refused, strict=True):
        name = prompt.source if prompt.source == TOY_SAFETY else "safety"
        rendered = backend.render(prompt.prompt)  # as lm-eval samples: the text the model saw
        sample = score_sample(
            name, rendered, generation.text, generation.token_ids, generation.finish_reason, spec.loop
        )
        sample.target = "refusal" if prompt.harmful else "answer"
        sample.refused = is_refused
        sample.correct = is_refused == prompt.harmful
        samples.append(sample)
    return safety_scores(prompts, refused, judge.name), samples


def _run_lm_eval(
    lm, model_args: dict | None, tokenizer, device: str, suite: Suite, spec: EvalSpec
) -> LmEvalRun:
    include_path = prepare_toy_tasks(seed=spec.toy_seed) if suite.toy else None
    return run_lm_eval(
        lm,
        suite.lm_eval_tasks,
        model_args=model_args,
        gen=spec.gen,
        limit=spec.limit,
        loop=spec.loop,
        chat_template=spec.chat_template,
        tokenizer=tokenizer,
        device=device,
        include_path=include_path,
        include_defaults=not suite.toy,
        unsafe_code=suite.unsafe_code,
    )


def _free_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
