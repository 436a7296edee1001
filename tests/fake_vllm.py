"""A stand-in for the `vllm` package at its module seam, for machines without a GPU.

`make_fake_vllm()` returns a module object with `LLM` and `SamplingParams` shaped like vLLM's
documented API, backed by a real transformers model on the CPU: greedy generation with vLLM's
semantics (EOS and stop tokens end a generation and stay in `token_ids`, stop strings cut the text,
`finish_reason` "stop" or "length") and prompt log-probabilities from a forward pass.

It is strict in two ways, so tests catch drift between our code and vLLM:
- it accepts only the keywords `evals.backends.vllm.VLLM_KEYWORDS` declares (which
  tests/test_vllm_api.py checks against vLLM itself), and its outputs have only the attributes
  `VLLM_ATTRIBUTES` declares: anything else our code passes or reads raises;
- it records every engine built (`module.engines`, each call's keywords) and how many engines
  were alive at once (`module.max_alive`).
"""

from __future__ import annotations

import types
import weakref

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.backends.vllm import VLLM_ATTRIBUTES, VLLM_KEYWORDS

# vLLM's own defaults for the SamplingParams fields this fake looks at.
SAMPLING_DEFAULTS = {
    "n": 1,
    "temperature": 1.0,
    "max_tokens": 16,
    "min_tokens": 0,
    "repetition_penalty": 1.0,
    "stop": None,
    "stop_token_ids": None,
    "ignore_eos": False,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "prompt_logprobs": None,
}


def _declared(kind: str):
    """A class whose instances hold exactly the attributes we declared we read from vLLM's `kind`."""
    names = tuple(sorted(VLLM_ATTRIBUTES[kind]))

    def __init__(self, **values):
        for name, value in values.items():
            setattr(self, name, value)  # an undeclared name raises AttributeError (__slots__)

    return type(kind, (), {"__slots__": names, "__init__": __init__})


CompletionOutput = _declared("CompletionOutput")
RequestOutput = _declared("RequestOutput")
Logprob = _declared("Logprob")
ModelConfig = _declared("ModelConfig")


def _check_keywords(callable_name: str, given) -> None:
    unknown = set(given) - VLLM_KEYWORDS[callable_name]
    if unknown:
        raise TypeError(f"fake vllm: {callable_name} got undeclared keywords {sorted(unknown)}")


def make_fake_vllm() -> types.ModuleType:
    """A fresh fake `vllm` module (its records start empty).

    Returns:
        The module; put it in `sys.modules["vllm"]`.
    """
    module = types.ModuleType("vllm")
    module.engines = []  # the keywords of every LLM(...) built
    module.generate_calls = []  # (number of prompts, SamplingParams keywords) per generate()
    module.alive = 0
    module.max_alive = 0

    class SamplingParams:
        def __init__(self, **kwargs):
            _check_keywords("SamplingParams", kwargs)
            self.kwargs = kwargs
            self.values = SAMPLING_DEFAULTS | kwargs

    class LLM:
        # Only `model_config` and `generate` are public, as VLLM_ATTRIBUTES["LLM"] declares.
        __slots__ = ("model_config", "_tokenizer", "_model", "__weakref__")

        def __init__(self, **kwargs):
            _check_keywords("LLM", kwargs)
            module.engines.append(kwargs)
            self._tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])
            self._model = AutoModelForCausalLM.from_pretrained(kwargs["model"], dtype=torch.float32).eval()
            own_len = self._model.config.max_position_embeddings
            self.model_config = ModelConfig(max_model_len=kwargs.get("max_model_len") or own_len)
            module.alive += 1
            module.max_alive = max(module.max_alive, module.alive)
            weakref.finalize(self, _engine_gone, module)

        def generate(self, prompts, sampling_params=None, **kwargs):
            _check_keywords("LLM.generate", {"sampling_params", *kwargs})
            params = sampling_params.values
            module.generate_calls.append((len(prompts), dict(sampling_params.kwargs)))
            outputs = []
            for prompt in prompts:
                _check_keywords("TokensPrompt", prompt)
                ids = list(prompt["prompt_token_ids"])
                if params["prompt_logprobs"] is not None:
                    outputs.append(self._score(ids))
                else:
                    outputs.append(RequestOutput(outputs=[self._greedy(ids, params)], prompt_logprobs=None))
            return outputs

        @torch.inference_mode()
        def _greedy(self, ids: list[int], params: dict):
            if params["temperature"] != 0.0 or params["repetition_penalty"] != 1.0 or params["n"] != 1:
                raise NotImplementedError("the fake vllm decodes greedily, one sequence, no penalty")
            stop_ids = [] if params["ignore_eos"] else list(params["stop_token_ids"] or [])
            out = self._model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=params["max_tokens"],
                min_new_tokens=params["min_tokens"],
                eos_token_id=stop_ids or None,
                pad_token_id=self._tokenizer.pad_token_id,
            )
            new = out[0, len(ids) :].tolist()
            finish = "length"
            for end, token in enumerate(new):
                if token in stop_ids:
                    new, finish = new[: end + 1], "stop"  # vLLM keeps the stop token in token_ids
                    break
            skip = params["skip_special_tokens"]
            text = self._tokenizer.decode(new, skip_special_tokens=skip)
            for end in range(1, len(new) + 1):  # vLLM checks stop strings after every token
                partial = self._tokenizer.decode(new[:end], skip_special_tokens=skip)
                hits = [partial.find(s) for s in params["stop"] or [] if s in partial]
                if hits:
                    new, text, finish = new[:end], partial[: min(hits)], "stop"
                    break
            return CompletionOutput(text=text, token_ids=tuple(new), finish_reason=finish)

        @torch.inference_mode()
        def _score(self, ids: list[int]):
            logprobs = self._model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            positions = [None]
            for pos in range(1, len(ids)):
                row = logprobs[pos - 1]
                top = int(row.argmax())
                positions.append(
                    {ids[pos]: Logprob(logprob=float(row[ids[pos]])), top: Logprob(logprob=float(row[top]))}
                )
            first = CompletionOutput(text="", token_ids=(int(logprobs[-1].argmax()),), finish_reason="length")
            return RequestOutput(outputs=[first], prompt_logprobs=positions)

    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def _engine_gone(module: types.ModuleType) -> None:
    module.alive -= 1
