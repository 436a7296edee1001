"""Generation backends, registered lazily: a backend's heavy dependency is imported only when chosen.

Importing this package is cheap (the `scf` CLI lists `BACKENDS` at start-up); the interface
(`Backend`, `Generation`, `check_model_dir`) lives in `evals.backends.base`.

Example:
    >>> backend = load_backend("transformers", "path/to/model", device="cpu")  # doctest: +SKIP
    >>> backend.generate(["2+2"], GenParams(max_new_tokens=8))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from evals.errors import EvalError

if TYPE_CHECKING:
    from evals.backends.base import Backend
    from evals.spec import VllmSettings

# name -> "module:Class"; the module is imported only when that backend is asked for.
BACKENDS = {
    "transformers": "evals.backends.transformers:TransformersBackend",
    "vllm": "evals.backends.vllm:VLLMBackend",
}

__all__ = ["BACKENDS", "load_backend"]


def load_backend(
    name: str,
    model: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    chat_template: bool = True,
    seed: int = 0,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    vllm: VllmSettings | None = None,
) -> Backend:
    """Load a model into the named backend.

    Args:
        name: a key of `BACKENDS`.
        model: local model directory (config + tokenizer + weights).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        dtype: "auto" (the checkpoint's dtype), "float32", "float16" or "bfloat16".
        chat_template: apply the tokenizer's chat template to prompts when it has one.
        seed: the engine seed (vLLM); sampling seeds come from `GenParams.seed`.
        trust_remote_code: let the model's own Python code run (off by default; logged when on).
        allow_pickle: load pickled `.bin` weights when there are no safetensors.
        vllm: vLLM engine settings (default `VllmSettings()`); ignored by other backends.

    Returns:
        The ready backend.

    Raises:
        EvalError: unknown backend name, bad model directory, backend unavailable here.
    """
    from evals.backends.base import check_model_dir
    from evals.spec import VllmSettings

    if name not in BACKENDS:
        raise EvalError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    model_dir = check_model_dir(model, allow_pickle=allow_pickle)
    module_name, class_name = BACKENDS[name].split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class(
        model_dir,
        device=device,
        dtype=dtype,
        chat_template=chat_template,
        seed=seed,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        vllm=vllm if vllm is not None else VllmSettings(),
    )
