"""The vLLM backend (GPU only; `pip install scf-pipeline[vllm]`), against vLLM's documented API.

    llm = vllm.LLM(model=<dir>, seed=..., dtype=..., tokenizer=<dir>)
    outs = llm.generate(prompts, vllm.SamplingParams(temperature, top_p, max_tokens,
                                                     repetition_penalty, stop, seed))
    outs[i].outputs[0].text / .token_ids / .finish_reason

`vllm` is imported only when this backend is constructed. Every SamplingParams field that changes
the output is set from `GenParams`: vLLM otherwise takes defaults from the model's
generation_config.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

from evals.backends.base import Backend, Generation
from evals.errors import EvalError
from evals.spec import GenParams


def _import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise EvalError(
            f"backend 'vllm' asked for but the vllm package is not installed ({err}); "
            "install the extra (pip install 'scf-pipeline[vllm]') or use --backend transformers"
        ) from err


def _require_gpu(device: str) -> None:
    import torch

    if device == "cpu":
        raise EvalError(
            "backend 'vllm' runs on GPU only but --device cpu was asked for; use --backend transformers"
        )
    if not torch.cuda.is_available():
        raise EvalError(
            "backend 'vllm' needs a CUDA GPU and none is available here; use --backend transformers"
        )


class VLLMBackend(Backend):
    """A model served by an in-process `vllm.LLM`.

    Args:
        model_dir: checked model directory.
        device: "auto" or "cuda" ("cpu" is refused).
        dtype: "auto" or a dtype name, passed to `LLM(dtype=...)`.
        chat_template: apply the tokenizer's chat template (when it has one) before generating.
        seed: the engine seed, `LLM(seed=...)`.

    Raises:
        EvalError: vllm not installed, or no GPU.
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
    ) -> None:
        self._vllm = _import_vllm()
        _require_gpu(device)
        self.llm = self._vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed)
        self.tokenizer = self.llm.get_tokenizer()
        self.use_chat_template = chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        eos = self.tokenizer.eos_token_id
        self._eos_ids = [] if eos is None else [int(eos)]

    @property
    def eos_token_ids(self) -> list[int]:
        """The tokenizer's EOS id (vLLM also stops on the generation_config's EOS ids)."""
        return list(self._eos_ids)

    @property
    def device(self) -> str:
        """vLLM always runs on CUDA."""
        return "cuda"

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
            top_k=-1,  # off (every vLLM version accepts -1 for "consider all tokens")
            min_p=0.0,
            max_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            stop=list(params.stop),
            seed=params.seed,
            skip_special_tokens=True,
        )

    def generate(
        self, prompts: Sequence[str], params: GenParams, *, progress: bool = False
    ) -> list[Generation]:
        """Generate one continuation per prompt (vLLM schedules its own batches).

        Args:
            prompts: user messages.
            params: decoding settings.
            progress: show vLLM's progress bar.

        Returns:
            One `Generation` per prompt, in order.
        """
        rendered = [self.render(p) for p in prompts]
        outputs = self.llm.generate(rendered, self.sampling_params(params), use_tqdm=progress)
        return [_to_generation(out.outputs[0]) for out in outputs]


def _to_generation(completion) -> Generation:
    # vLLM's finish_reason is "stop" (EOS or a stop string), "length" (max_tokens) or "abort".
    if completion.finish_reason not in ("stop", "length"):
        raise EvalError(f"vllm ended a generation with finish_reason={completion.finish_reason!r}")
    return Generation(
        text=completion.text, token_ids=list(completion.token_ids), finish_reason=completion.finish_reason
    )
