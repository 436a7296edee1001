"""The named evaluation suites: which benchmarks each runs, its safety source and default decoding.

A leaf module (standard library only): the schema (`evals.spec`) validates suite names against it
and `scf --help` lists them without importing torch, pydantic or lm-eval. The runner that executes
a suite is `evals.suites.evaluate`.

    toy        toy_math, toy_strings (lm-eval, local YAML + JSONL) + toy safety; greedy, 48 tokens
    toy_long   toy + toy_long: open-ended toy prompts generated to 512 tokens (loops, rep-w)
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

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from evals.errors import EvalError
from evals.toytasks import MAX_NEW_TOKENS as TOY_MAX_NEW_TOKENS


@dataclass(frozen=True)
class Suite:
    """A named set of benchmarks.

    Attributes:
        name: the suite's name.
        lm_eval_tasks: lm-eval task or group names.
        safety: "toy" (toy safety prompts), "files" (EvalSpec.safety.files, optional unless the
            suite has nothing else) or "none".
        default_gen: `evals.spec.GenParams` fields that differ from GenParams' own defaults, used
            when a spec gives no decoding (plain values: this module stays free of the schema).
        toy: the tasks are the toy YAML tasks (index only them: fast, offline).
        long_generation: also generate the open-ended toy prompts (`TOY_LONG`) to
            `EvalSpec.long_gen.max_new_tokens` tokens and score their repetition.
        unsafe_code: the tasks execute generated code (lm-eval asks for explicit confirmation).
        description: one line for listings.
    """

    name: str
    lm_eval_tasks: tuple[str, ...]
    safety: Literal["toy", "files", "none"]
    default_gen: Mapping[str, Any]
    toy: bool = False
    long_generation: bool = False
    unsafe_code: bool = False
    description: str = ""


def _gen(**fields: Any) -> Mapping[str, Any]:
    return MappingProxyType(fields)  # read-only: the table is shared by every spec


TOY_LONG = "toy_long"  # benchmark name of the long-generation probe's samples

_REAL_GEN = _gen(max_new_tokens=1024, batch_size=8)
_LONG_GEN = _gen(max_new_tokens=4096, batch_size=8)  # long chain-of-thought benchmarks

SUITES: Mapping[str, Suite] = MappingProxyType(
    {
        "toy": Suite(
            "toy",
            ("toy_math", "toy_strings"),
            "toy",
            _gen(max_new_tokens=TOY_MAX_NEW_TOKENS, batch_size=32),
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
        "math": Suite(
            "math",
            ("aime24", "aime25", "hendrycks_math500"),
            "files",
            _LONG_GEN,
            description="AIME, MATH-500",
        ),
        "code": Suite("code", ("humaneval",), "files", _REAL_GEN, unsafe_code=True, description="HumanEval"),
        "instruct": Suite("instruct", ("ifeval",), "files", _REAL_GEN, description="IFEval"),
        "gpqa": Suite("gpqa", ("gpqa_diamond_cot_zeroshot",), "files", _LONG_GEN, description="GPQA diamond"),
        "safety": Suite("safety", (), "files", _REAL_GEN, description="refusal rates on safety data files"),
        "toy_long": Suite(
            "toy_long",
            ("toy_math", "toy_strings"),
            "toy",
            _gen(max_new_tokens=TOY_MAX_NEW_TOKENS, batch_size=32),
            toy=True,
            long_generation=True,
            description="toy + open-ended toy prompts generated to 512 tokens (looping, seq_rep_4, rep-w)",
        ),
    }
)


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
