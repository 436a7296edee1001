"""Generation backends: the real transformers backend on tiny Llama models; vLLM's adapter at its seam."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from evals import toytasks
from evals.backends import load_backend
from evals.backends.base import check_model_dir
from evals.errors import EvalError
from evals.spec import GenParams
from evals.zoo import save_untrained

PROMPTS = ["2+2", "reverse abcdef", "how do i make a bomb?", "sort cab", "copy hgfedcba and more text"]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    """A random-init tiny Llama with the zoo tokenizer (chat template included)."""
    return save_untrained(tmp_path_factory.mktemp("models") / "untrained")


@pytest.fixture(scope="module")
def backend(untrained):
    return load_backend("transformers", untrained, device="cpu")


def test_length_finish_and_token_ids(backend):
    out = backend.generate(PROMPTS[:2], GenParams(max_new_tokens=7))
    for generation in out:
        assert generation.finish_reason == "length"
        assert len(generation.token_ids) == 7
        assert generation.text == backend.tokenizer.decode(generation.token_ids, skip_special_tokens=True)


def test_batched_greedy_equals_one_by_one(backend):
    params = GenParams(max_new_tokens=12, batch_size=5)
    batched = backend.generate(PROMPTS, params)
    single = [backend.generate([p], params.model_copy(update={"batch_size": 1}))[0] for p in PROMPTS]
    assert batched == single
    assert len({g.text for g in batched}) > 1  # different prompts, different answers


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(backend):
    params = GenParams(max_new_tokens=16, temperature=1.0, seed=7)
    state = torch.random.get_rng_state()
    first = backend.generate(PROMPTS[:2], params)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert backend.generate(PROMPTS[:2], params) == first
    other = backend.generate(PROMPTS[:2], params.model_copy(update={"seed": 8}))
    assert other != first
    assert first != backend.generate(PROMPTS[:2], GenParams(max_new_tokens=16))  # not greedy


def test_stop_string_cuts_text_and_stops(backend):
    greedy = backend.generate(PROMPTS[:1], GenParams(max_new_tokens=20))[0]
    stop = greedy.text[3:5]
    cut = greedy.text.find(stop)
    out = backend.generate(PROMPTS[:1], GenParams(max_new_tokens=20, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == greedy.text[:cut]
    assert out.token_ids == greedy.token_ids[: cut + len(stop)]  # char-level tokens up to the stop


def test_chat_template_applied_and_can_be_turned_off(untrained, backend):
    assert backend.render("2+2") == toytasks.render_prompt("2+2") == "<s>Q:2+2\nA:"
    raw = load_backend("transformers", untrained, device="cpu", chat_template=False)
    assert raw.render("2+2") == "2+2"
    params = GenParams(max_new_tokens=10)
    # The template is the only difference: feeding the rendered text raw gives the same output.
    assert raw.generate([toytasks.render_prompt("2+2")], params) == backend.generate(["2+2"], params)


def test_checkpoint_generation_config_cannot_change_the_output(untrained, backend, tmp_path):
    """A checkpoint's generation_config.json (lm-eval #3154) must not override GenParams."""
    tweaked = tmp_path / "tweaked"
    shutil.copytree(untrained, tweaked)
    config = json.loads((tweaked / "generation_config.json").read_text())
    config.update(max_new_tokens=3, repetition_penalty=5.0, do_sample=True, temperature=3.0, top_k=2)
    (tweaked / "generation_config.json").write_text(json.dumps(config))
    params = GenParams(max_new_tokens=10)
    out = load_backend("transformers", tweaked, device="cpu").generate(PROMPTS[:2], params)
    assert out == backend.generate(PROMPTS[:2], params)
    assert all(len(g.token_ids) == 10 for g in out)


def test_eos_stops_a_trained_model(tiny_zoo):
    math = load_backend("transformers", tiny_zoo / "math", device="cpu")
    assert math.eos_token_ids == [math.tokenizer.eos_token_id]
    out = math.generate(["37+45", "12+30"], GenParams(max_new_tokens=toytasks.MAX_NEW_TOKENS, batch_size=2))
    for generation in out:
        assert generation.finish_reason == "stop"
        assert generation.text.isdigit()  # a number, then EOS: nothing after it
        assert generation.token_ids == math.tokenizer(generation.text)["input_ids"]  # EOS excluded


def test_bad_model_directories(untrained, tmp_path):
    with pytest.raises(EvalError, match="model directory not found: .*absent"):
        check_model_dir(tmp_path / "absent")
    no_config = tmp_path / "no_config"
    shutil.copytree(untrained, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(EvalError, match="no_config has no config.json"):
        load_backend("transformers", no_config)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(untrained / "config.json", no_tokenizer)
    with pytest.raises(EvalError, match="no_tokenizer has no tokenizer"):
        load_backend("transformers", no_tokenizer)
    with pytest.raises(EvalError, match="unknown backend 'tgi'; known: transformers, vllm"):
        load_backend("tgi", untrained)


def test_cuda_asked_for_without_gpu(untrained, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EvalError, match="CUDA is not available"):
        load_backend("transformers", untrained, device="cuda")
