"""Generation backends, registered lazily: a backend's heavy dependency is imported only when chosen.

Example:
    >>> backend = load_backend("transformers", "path/to/model", device="cpu")  # doctest: +SKIP
    >>> backend.generate(["2+2"], GenParams(max_new_tokens=8))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from pathlib import Path

from evals.backends.base import Backend, Generation, check_model_dir
from evals.errors import EvalError

# name -> "module:Class"; the module is imported only when that backend is asked for.
BACKENDS = {
    "transformers": "evals.backends.transformers:TransformersBackend",
    "vllm": "evals.backends.vllm:VLLMBackend",
}

__all__ = ["BACKENDS", "Backend", "Generation", "check_model_dir", "load_backend"]


def load_backend(
    name: str,
    model: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    chat_template: bool = True,
    seed: int = 0,
) -> Backend:
    """Load a model into the named backend.

    Args:
        name: a key of `BACKENDS`.
        model: local model directory (config + tokenizer + weights).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        dtype: "auto" (the checkpoint's dtype), "float32", "float16" or "bfloat16".
        chat_template: apply the tokenizer's chat template to prompts when it has one.
        seed: the engine seed (vLLM); sampling seeds come from `GenParams.seed`.

    Returns:
        The ready backend.

    Raises:
        EvalError: unknown backend name, bad model directory, backend unavailable here.
    """
    if name not in BACKENDS:
        raise EvalError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    model_dir = check_model_dir(model)
    return backend_class(model_dir, device=device, dtype=dtype, chat_template=chat_template, seed=seed)
