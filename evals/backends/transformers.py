"""The default backend: `transformers` generation, batched with left padding, on CPU or CUDA."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig

from evals.backends.base import Backend, Generation, eos_ids_from, load_tokenizer, one_line, warn_remote_code
from evals.errors import EvalError
from evals.spec import GenParams, VllmSettings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> str:
    """Turn "auto" into "cuda" when a GPU is visible, else "cpu"; refuse "cuda" without one.

    Args:
        device: "auto", "cpu" or "cuda" (or "cuda:N").

    Returns:
        The torch device string.

    Raises:
        EvalError: "cuda" asked for on a machine without CUDA.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(
            f"device {device!r} asked for but CUDA is not available here; use --device cpu or auto"
        )
    return device


class TransformersBackend(Backend):
    """A causal LM loaded with `AutoModelForCausalLM` from a local directory.

    Args:
        model_dir: checked model directory.
        device: "auto", "cpu" or "cuda".
        dtype: "auto" (the checkpoint's dtype) or a dtype name.
        chat_template: wrap each prompt as one user turn of the tokenizer's chat template
            (when the tokenizer has one) and add no further special tokens; otherwise the prompt
            is tokenized as is, with the tokenizer's own special tokens (e.g. BOS).
        seed: unused here (sampling seeds come from `GenParams.seed`); kept for one constructor shape.
        trust_remote_code: let transformers run the model's own Python code (`auto_map`); off
            unless asked for, and logged when on.
        allow_pickle: also accept pickled `.bin` weights (without it only safetensors are read).
        vllm: unused here (vLLM engine settings); kept for one constructor shape.

    Raises:
        EvalError: the tokenizer or the model cannot be loaded (one line naming the directory).
    """

    name = "transformers"

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
        self._device = resolve_device(device)
        warn_remote_code(model_dir, trust_remote_code)
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        # Left padding keeps every prompt's last token at the end, where generation continues.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
        self._settings = {
            "device": self._device,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            # use_safetensors=True: transformers never falls back to a pickled .bin next to them.
            "use_safetensors": None if allow_pickle else True,
        }
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                model_dir,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=self._settings["use_safetensors"],
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            problem = f"the model cannot be loaded ({one_line(err)})"
            raise EvalError(f"model directory {model_dir}: {problem}") from err
        self.model.to(self._device).eval()
        self.use_chat_template = chat_template and bool(self.tokenizer.chat_template)
        self._eos_ids = eos_ids_from(
            self.model.generation_config.eos_token_id,
            self.model.config.eos_token_id,
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
        """Where the model runs."""
        return self._device

    @property
    def engine_settings(self) -> dict[str, Any]:
        """Device, dtype asked for, and the loading switches (trust_remote_code, use_safetensors)."""
        return dict(self._settings)

    def lm_eval_model(self, gen: GenParams):
        """lm-eval's "hf" model around this backend's loaded model and tokenizer.

        One load serves safety and reasoning. The model's generation_config is replaced by our
        explicit one: transformers would otherwise let a checkpoint's generation_config.json (e.g.
        its own max_new_tokens) override what lm-eval asks for (lm-eval issue #3154).

        Args:
            gen: decoding settings (`gen.batch_size` is lm-eval's batch size).

        Returns:
            An `lm_eval.models.huggingface.HFLM`.
        """
        from lm_eval.models.huggingface import HFLM

        config = self.generation_config(gen)
        # lm-eval passes max_length = prompt + max_gen_toks (= gen.max_new_tokens) itself; a second
        # length setting would only make transformers warn on every batch.
        config.max_new_tokens = None
        self.model.generation_config = config
        return HFLM(
            pretrained=self.model,
            tokenizer=self.tokenizer,
            batch_size=gen.batch_size,
            trust_remote_code=self._settings["trust_remote_code"],
        )

    def close(self) -> None:
        """Drop the model and return its CUDA memory to the driver's cache."""
        self.model = None
        gc.collect()
        if self._device.startswith("cuda"):
            torch.cuda.empty_cache()

    def render(self, prompt: str) -> str:
        """The exact text fed to the model for a user message (chat template applied when in use).

        Args:
            prompt: the user message.

        Returns:
            The rendered prompt.
        """
        if not self.use_chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(
        self, prompts: Sequence[str], params: GenParams, *, progress: bool = False
    ) -> list[Generation]:
        """Generate one continuation per prompt, `params.batch_size` prompts at a time.

        Args:
            prompts: user messages.
            params: decoding settings (greedy when temperature is 0, else sampled with
                `params.seed`; a batch's sampled output depends on seed and batch composition).
            progress: show a tqdm bar over batches.

        Returns:
            One `Generation` per prompt, in order.
        """
        config = self.generation_config(params)
        out: list[Generation] = []
        starts = range(0, len(prompts), params.batch_size)
        for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
            batch = list(prompts[start : start + params.batch_size])
            out.extend(self._generate_batch(batch, config, params, seed=params.seed + start))
        return out

    def generation_config(self, params: GenParams) -> GenerationConfig:
        """A GenerationConfig with every setting that affects the output given explicitly.

        transformers fills settings left as None from the checkpoint's generation_config.json
        (e.g. top_k=50, a repetition penalty): set them all, so only `params` decides.

        Args:
            params: decoding settings.

        Returns:
            The config passed to `model.generate`.
        """
        # Sampling-only filters are set when sampling (greedy decoding never applies them, and
        # transformers warns about them otherwise); top_k=0 turns off the default top-k of 50.
        sampling = {} if params.greedy else {"top_k": 0, "min_p": 0.0, "typical_p": 1.0}
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=0,
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else 1.0,
            top_p=params.top_p,
            **sampling,
            repetition_penalty=params.repetition_penalty,
            no_repeat_ngram_size=0,
            num_beams=1,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=list(params.stop) or None,
        )

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[str], config: GenerationConfig, params: GenParams, *, seed: int
    ) -> list[Generation]:
        rendered = [self.render(p) for p in prompts]
        # The chat template already holds the special tokens (BOS); don't add them twice.
        enc = self.tokenizer(
            rendered, return_tensors="pt", padding=True, add_special_tokens=not self.use_chat_template
        ).to(self._device)
        devices = [torch.device(self._device)] if self._device.startswith("cuda") else []
        # A local RNG state: sampling is reproducible for a seed and leaves the global RNG untouched.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(**enc, generation_config=config, tokenizer=self.tokenizer)
        new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()  # (batch, <= max_new_tokens)
        return [self._to_generation(ids, params) for ids in new_tokens]

    def _to_generation(self, ids: list[int], params: GenParams) -> Generation:
        eos = set(self._eos_ids)
        stop_at = next((i for i, t in enumerate(ids) if t in eos), None)
        if stop_at is not None:
            ids = ids[:stop_at]
        elif self.tokenizer.pad_token_id not in eos:
            # A row that stopped on a stop string early is padded up to the batch's length.
            while ids and ids[-1] == self.tokenizer.pad_token_id:
                ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        text, hit_stop = cut_at_stop(text, params.stop)
        stopped = stop_at is not None or hit_stop or len(ids) < params.max_new_tokens
        return Generation(text=text, token_ids=ids, finish_reason="stop" if stopped else "length")


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string.

    Args:
        text: decoded text.
        stop: stop strings.

    Returns:
        (the text before the first stop string, whether one was found).
    """
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if not hits:
        return text, False
    return text[: min(hits)], True

