"""The vLLM backend (GPU only; `pip install scf-pipeline[vllm]`), against vLLM's documented API.

    llm = vllm.LLM(model=<dir>, tokenizer=<dir>, dtype=..., seed=..., trust_remote_code=False,
                   load_format="safetensors", tensor_parallel_size=..., gpu_memory_utilization=...,
                   max_model_len=..., enforce_eager=..., max_num_seqs=...)
    outs = llm.generate([{"prompt_token_ids": ids}, ...], vllm.SamplingParams(...), use_tqdm=...)
    outs[i].outputs[0].text / .token_ids / .finish_reason;  outs[i].prompt_logprobs[j][token].logprob

One engine serves a whole evaluation: the safety prompts through `generate`, and lm-eval's tasks
through `lm_eval_model` (`evals.backends.vllm_lm.VLLMBackendLM`: generation and prompt
log-probabilities on this same `LLM`). `vllm` is imported only when this backend is constructed.
Every SamplingParams field that changes the output is set from `GenParams`: vLLM otherwise takes
defaults from the model's generation_config.

`VLLM_KEYWORDS` and `VLLM_ATTRIBUTES` list every name of vLLM's API this module uses.
tests/test_vllm_api.py checks each one against vLLM itself (installed, or the sources of a wheel),
and the fake `vllm` of the tests accepts nothing else, so the lists cannot drift from the code.
"""

from __future__ import annotations

import gc
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals.backends.base import Backend, Generation, eos_ids_from, load_tokenizer, warn_remote_code
from evals.errors import EvalError
from evals.spec import GenParams, VllmSettings

# Keyword arguments passed to each vLLM callable. LLM hands most of its keywords on to
# EngineArgs (**kwargs), so a name here must be a parameter of LLM or a field of EngineArgs.
VLLM_KEYWORDS: dict[str, frozenset[str]] = {
    "LLM": frozenset(
        {
            "model",
            "tokenizer",
            "dtype",
            "seed",
            "trust_remote_code",
            "load_format",
            "tensor_parallel_size",
            "gpu_memory_utilization",
            "max_model_len",
            "enforce_eager",
            "max_num_seqs",
        }
    ),
    "LLM.generate": frozenset({"sampling_params", "use_tqdm"}),  # prompts go first, by position
    "SamplingParams": frozenset(
        {
            "n",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "max_tokens",
            "min_tokens",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "stop",
            "stop_token_ids",
            "ignore_eos",
            "include_stop_str_in_output",
            "seed",
            "skip_special_tokens",
            "prompt_logprobs",
            "detokenize",
        }
    ),
    "TokensPrompt": frozenset({"prompt_token_ids"}),  # a TypedDict: prompts are plain dicts
}
# Attributes read from vLLM's objects.
VLLM_ATTRIBUTES: dict[str, frozenset[str]] = {
    "LLM": frozenset({"generate", "model_config"}),
    "ModelConfig": frozenset({"max_model_len"}),
    "RequestOutput": frozenset({"outputs", "prompt_logprobs"}),
    "CompletionOutput": frozenset({"text", "token_ids", "finish_reason"}),
    "Logprob": frozenset({"logprob"}),
}
# `top_k=0` considers every token (vLLM >= 0.33 documents 0, and still accepts -1).
TOP_K_OFF = 0


def _import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise EvalError(
            f"backend 'vllm' asked for but the vllm package is not installed ({err}); "
            "install the extra (pip install 'scf-pipeline[vllm]') or use --backend transformers"
        ) from err


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _require_gpu(device: str) -> None:
    if device == "cpu":
        raise EvalError(
            "backend 'vllm' runs on GPU only but --device cpu was asked for; use --backend transformers"
        )
    if not _cuda_available():
        raise EvalError(
            "backend 'vllm' needs a CUDA GPU and none is available here; use --backend transformers"
        )


def engine_kwargs(
    model_dir: Path,
    *,
    dtype: str,
    seed: int,
    trust_remote_code: bool,
    allow_pickle: bool,
    settings: VllmSettings,
) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` for one model: every engine setting explicit.

    Args:
        model_dir: the model directory (also its tokenizer).
        dtype: "auto" or a dtype name.
        seed: the engine seed.
        trust_remote_code: let vLLM run the model's own code.
        allow_pickle: let vLLM read pickled `.bin` weights (`load_format="auto"`); otherwise only
            safetensors are read.
        settings: the engine settings of the spec.

    Returns:
        The keywords (a subset of `VLLM_KEYWORDS["LLM"]`).
    """
    return {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": dtype,
        "seed": seed,
        "trust_remote_code": trust_remote_code,
        "load_format": "auto" if allow_pickle else "safetensors",
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_model_len": settings.max_model_len,
        "enforce_eager": settings.enforce_eager,
        "max_num_seqs": settings.max_num_seqs,
    }


class VLLMBackend(Backend):
    """A model served by one in-process `vllm.LLM`, for generation and for lm-eval's tasks.

    Args:
        model_dir: checked model directory.
        device: "auto" or "cuda" ("cpu" is refused).
        dtype: "auto" or a dtype name, passed to `LLM(dtype=...)`.
        chat_template: apply the tokenizer's chat template (when it has one) before generating.
        seed: the engine seed, `LLM(seed=...)`.
        trust_remote_code: let vLLM and transformers run the model's own code (logged when on).
        allow_pickle: accept pickled `.bin` weights.
        vllm: the engine settings (`VllmSettings`).

    Raises:
        EvalError: vllm not installed, no GPU, or an unusable tokenizer (checked before the engine
            starts, which takes minutes).
    """

    name = "vllm"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        chat_template: bool = True,
        seed: int = 0,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        vllm: VllmSettings | None = None,
    ) -> None:
        self._vllm = _import_vllm()
        _require_gpu(device)
        warn_remote_code(model_dir, trust_remote_code)
        # Our own copy of the tokenizer (vLLM loads the same files): it renders and encodes prompts.
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        self.settings = vllm if vllm is not None else VllmSettings()
        self._kwargs = engine_kwargs(
            model_dir,
            dtype=dtype,
            seed=seed,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            settings=self.settings,
        )
        self.llm = self._vllm.LLM(**self._kwargs)
        self.use_chat_template = chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        self._eos_ids = eos_ids_from(
            _json_key(model_dir / "generation_config.json", "eos_token_id"),
            _json_key(model_dir / "config.json", "eos_token_id"),
            self.tokenizer.eos_token_id,
        )
        if not self._eos_ids:
            raise EvalError(f"model directory {model_dir}: neither config nor tokenizer names an EOS token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a generation (generation config, model config and tokenizer EOS)."""
        return list(self._eos_ids)

    @property
    def device(self) -> str:
        """vLLM always runs on CUDA."""
        return "cuda"

    @property
    def engine_settings(self) -> dict[str, Any]:
        """The `vllm.LLM` keywords (the model path aside) and the request batch size."""
        settings = {k: v for k, v in self._kwargs.items() if k not in ("model", "tokenizer")}
        return settings | {"batch_size": self.settings.batch_size}

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + generation) the engine takes, in tokens."""
        if self.settings.max_model_len is not None:
            return self.settings.max_model_len
        return int(self.llm.model_config.max_model_len)  # the model's own, as vLLM resolved it

    def render(self, prompt: str) -> str:
        """The exact text fed to the model for a user message.

        Args:
            prompt: the user message.

        Returns:
            The prompt, wrapped in the chat template when in use.
        """
        if not self.use_chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def sampling_params(self, params: GenParams):
        """vLLM SamplingParams with every output-changing field set explicitly.

        Args:
            params: decoding settings.

        Returns:
            A `vllm.SamplingParams`.
        """
        return self._vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=TOP_K_OFF,
            min_p=0.0,
            max_tokens=params.max_new_tokens,
            min_tokens=0,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            stop=list(params.stop),
            stop_token_ids=self.eos_token_ids,
            ignore_eos=False,
            include_stop_str_in_output=False,
            seed=params.seed,
            skip_special_tokens=True,
        )

    def generate(
        self, prompts: Sequence[str], params: GenParams, *, progress: bool = False
    ) -> list[Generation]:
        """Generate one continuation per user message (vLLM schedules its own batches).

        Args:
            prompts: user messages.
            params: decoding settings.
            progress: show vLLM's progress bar.

        Returns:
            One `Generation` per prompt, in order.
        """
        # The chat template already holds the special tokens (BOS); don't add them twice.
        add_special = not self.use_chat_template
        ids = [self.tokenizer(self.render(p), add_special_tokens=add_special)["input_ids"] for p in prompts]
        return self.generate_ids(ids, params, progress=progress)

    def generate_ids(
        self, prompt_ids: Sequence[Sequence[int]], params: GenParams, *, progress: bool = False
    ) -> list[Generation]:
        """Generate one continuation per tokenized prompt.

        Args:
            prompt_ids: prompts as token ids (already rendered and encoded).
            params: decoding settings.
            progress: show vLLM's progress bar.

        Returns:
            One `Generation` per prompt, in order (the EOS token excluded from token_ids).
        """
        sampling = self.sampling_params(params)
        eos = set(self._eos_ids)
        outputs = self._run(prompt_ids, sampling, progress)
        return [_to_generation(out.outputs[0], eos) for out in outputs]

    def prompt_logprobs(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[dict[int, float] | None]]:
        """Log-probabilities of every prompt token given the tokens before it (one forward pass).

        Args:
            prompt_ids: token sequences.

        Returns:
            Per sequence, per position: None for the first token, else {token: logprob} holding
            at least the token itself and the most likely token at that position.
        """
        sampling = self._vllm.SamplingParams(
            n=1, temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False, seed=0
        )
        outputs = self._run(prompt_ids, sampling, progress=False)
        return [
            [
                None if pos is None else {tok: float(lp.logprob) for tok, lp in pos.items()}
                for pos in out.prompt_logprobs
            ]
            for out in outputs
        ]

    def _run(self, prompt_ids: Sequence[Sequence[int]], sampling, progress: bool) -> list:
        """`llm.generate` over the prompts, `settings.batch_size` requests per call ("auto": one call)."""
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        size = len(prompts) if self.settings.batch_size == "auto" else self.settings.batch_size
        outputs: list = []
        for start in range(0, len(prompts), max(size, 1)):
            chunk = prompts[start : start + size]
            outputs += self.llm.generate(chunk, sampling_params=sampling, use_tqdm=progress)
        return outputs

    def lm_eval_model(self, gen: GenParams):
        """lm-eval's model interface on this engine (`VLLMBackendLM`): no second engine.

        Args:
            gen: decoding settings.

        Returns:
            A `evals.backends.vllm_lm.VLLMBackendLM`.
        """
        from evals.backends.vllm_lm import VLLMBackendLM

        return VLLMBackendLM(self, gen)

    def close(self) -> None:
        """Drop the engine: vLLM shuts its engine-core process down when the LLM is collected."""
        self.llm = None
        gc.collect()


def _json_key(path: Path, key: str):
    """`key` of a JSON object file, or None when the file or key is absent."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _to_generation(completion, eos: set[int]) -> Generation:
    # vLLM's finish_reason is "stop" (EOS, a stop token or a stop string), "length" (max_tokens)
    # or "abort"; its token_ids end with the EOS token when that is what stopped it.
    if completion.finish_reason not in ("stop", "length"):
        raise EvalError(f"vllm ended a generation with finish_reason={completion.finish_reason!r}")
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop" and ids and ids[-1] in eos:
        ids = ids[:-1]
    return Generation(text=completion.text, token_ids=ids, finish_reason=completion.finish_reason)
