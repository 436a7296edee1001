"""The vLLM backend, through a fake `vllm` module (tests/fake_vllm.py) backed by a real model on CPU.

What is proven here: one engine per evaluation (safety prompts and lm-eval's tasks on the same
`LLM`; a judge model only after that engine is gone), engine settings taken from the spec and
recorded in the report, every sampling setting explicit, lm-eval's log-likelihoods through prompt
log-probabilities equal to lm-eval's own "hf" model, and the same scores as the transformers
backend on a trained zoo model. Whether vLLM itself accepts what we pass: tests/test_vllm_api.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from fake_vllm import CompletionOutput, make_fake_vllm

import evals.backends.vllm as vllm_backend
from evals.backends import BACKENDS, load_backend
from evals.errors import EvalError
from evals.spec import EvalSpec, GenParams, VllmSettings
from evals.suites import evaluate
from evals.zoo import save_untrained

SAFETY_FILE = Path(__file__).parent / "data" / "safety" / "xstest.csv"


@pytest.fixture
def fake(monkeypatch):
    """The fake vllm in place of the real one, on a machine that 'has' a GPU for it."""
    module = make_fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_backend, "_cuda_available", lambda: True)
    return module


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    return save_untrained(tmp_path_factory.mktemp("models") / "untrained")


def test_one_engine_serves_safety_and_lm_eval_and_scores_as_transformers(fake, tiny_zoo):
    settings = VllmSettings(
        gpu_memory_utilization=0.8, max_model_len=512, enforce_eager=True, max_num_seqs=8, batch_size=2
    )
    spec = EvalSpec(suite="toy", limit=3, backend="vllm", device="cuda", vllm=settings)
    report = evaluate(tiny_zoo / "math", spec, progress=False)

    assert len(fake.engines) == 1 and fake.max_alive == 1  # one engine for safety + lm-eval tasks
    assert fake.alive == 0  # released when the evaluation ends
    expected_engine = {
        "dtype": "auto",
        "seed": 0,
        "trust_remote_code": False,
        "load_format": "safetensors",  # never a pickled .bin fallback
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.8,
        "max_model_len": 512,
        "enforce_eager": True,
        "max_num_seqs": 8,
    }
    model = str((tiny_zoo / "math").resolve())
    assert fake.engines[0] == {"model": model, "tokenizer": model, **expected_engine}
    assert report.engine == {**expected_engine, "batch_size": 2}
    assert all(n <= 2 for n, _ in fake.generate_calls)  # batch_size requests per engine call
    assert EvalSpec.model_validate(report.spec.model_dump()).vllm == settings  # recorded in the report

    reference = evaluate(tiny_zoo / "math", EvalSpec(suite="toy", limit=3, device="cpu"), progress=False)
    assert report.metrics() == reference.metrics()
    assert report.metrics()["toy_math.exact_match"] > 0  # a trained model: real answers compared
    ours = [(s.benchmark, s.prompt, s.text, s.token_ids, s.finish_reason) for s in report.samples]
    assert ours == [(s.benchmark, s.prompt, s.text, s.token_ids, s.finish_reason) for s in reference.samples]
    assert report.eos_token_ids == reference.eos_token_ids == [2]


def test_a_judge_model_is_loaded_only_after_the_evaluated_engine_is_gone(fake, untrained):
    safety = {"files": (SAFETY_FILE,)}
    spec = EvalSpec(
        suite="safety", backend="vllm", judge=str(untrained), safety=safety, gen=GenParams(max_new_tokens=4)
    )
    report = evaluate(untrained, spec, progress=False)
    assert [engine["model"] for engine in fake.engines] == [str(untrained.resolve())] * 2
    assert fake.max_alive == 1 and fake.alive == 0
    assert report.safety.judge == "model:vllm" and report.safety.n_benign == 2


def test_loglikelihood_through_prompt_logprobs_equals_lm_evals_hf_model(fake, untrained):
    from lm_eval.api.instance import Instance

    gen = GenParams(max_new_tokens=8)
    ours = load_backend("vllm", untrained).lm_eval_model(gen)
    theirs = load_backend("transformers", untrained, device="cpu").lm_eval_model(gen)
    pairs = [("<s>Q:2+2\nA:", "4"), ("sort cab ", "abc</s>"), ("", "hello"), ("12+30=", "42 and more")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
    assert all(lp < 0 for lp, _ in got)

    texts = [("copy abcdef " * 30,), ("reverse xyz",)]  # the first spans several windows
    rolling = [Instance("loglikelihood_rolling", {}, text, i) for i, text in enumerate(texts)]
    own_context = json.loads((untrained / "config.json").read_text())["max_position_embeddings"]
    assert ours.max_length == own_context  # vLLM's resolved max_model_len when none is set
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(
        theirs.loglikelihood_rolling(rolling), abs=1e-3
    )


def test_every_sampling_setting_is_explicit(fake, untrained):
    backend = load_backend("vllm", untrained, dtype="bfloat16", seed=3)
    params = GenParams(
        max_new_tokens=9, temperature=0.5, top_p=0.9, repetition_penalty=1.1, seed=4, stop=("\n",)
    )
    assert backend.sampling_params(params).kwargs == {
        "n": 1,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 0,
        "min_p": 0.0,
        "max_tokens": 9,
        "min_tokens": 0,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop": ["\n"],
        "stop_token_ids": [2],
        "ignore_eos": False,
        "include_stop_str_in_output": False,
        "seed": 4,
        "skip_special_tokens": True,
    }
    assert (fake.engines[0]["dtype"], fake.engines[0]["seed"]) == ("bfloat16", 3)
    assert backend.device == "cuda" and backend.eos_token_ids == [2]


def test_stop_string_and_length_finish(fake, untrained):
    backend = load_backend("vllm", untrained)
    reference = load_backend("transformers", untrained, device="cpu")
    for params in (GenParams(max_new_tokens=7), GenParams(max_new_tokens=20, stop=("a",))):
        got = backend.generate(["2+2", "reverse abcdef"], params)
        assert got == reference.generate(["2+2", "reverse abcdef"], params)
    sent = fake.generate_calls[0]
    assert sent[0] == 2  # both prompts in one engine call (batch_size "auto")


def test_aborted_generation_is_an_error():
    aborted = CompletionOutput(text="", token_ids=(), finish_reason="abort")
    with pytest.raises(EvalError, match="finish_reason='abort'"):
        vllm_backend._to_generation(aborted, {2})


def test_vllm_not_installed_or_no_gpu(untrained, monkeypatch):
    assert BACKENDS["vllm"] == "evals.backends.vllm:VLLMBackend"
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(EvalError, match="vllm package is not installed.*--backend transformers"):
        load_backend("vllm", untrained)
    monkeypatch.setitem(sys.modules, "vllm", make_fake_vllm())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EvalError, match="needs a CUDA GPU and none is available.*--backend transformers"):
        load_backend("vllm", untrained)
    with pytest.raises(EvalError, match="GPU only but --device cpu"):
        load_backend("vllm", untrained, device="cpu")
