"""The toy model zoo: tiny Llama-architecture models trained here on CPU, saved like real checkpoints.

``base`` is trained on generic toy text plus a little of every task; the specialists are fine-tuned
from it: ``math``, ``strings``, ``safety`` and ``weak`` (a deliberately under-trained math
specialist, for strong-weak merges). All share the tokenizer and architecture, so they merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from evals.errors import EvalError
from evals.tokenizer import build_tokenizer

ZOO_MODELS = ("base", "math", "strings", "safety", "weak")
SIZES = ("tiny", "small")


@dataclass(frozen=True)
class Architecture:
    """The Llama shape of one zoo size."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 128


ARCHITECTURES = {
    "tiny": Architecture(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
    "small": Architecture(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2),
}


def _check_size(size: str) -> None:
    if size not in ARCHITECTURES:
        raise EvalError(f"unknown zoo size {size!r}; known: {', '.join(SIZES)}")


def model_config(size: str = "tiny") -> LlamaConfig:
    """The LlamaConfig every model of a zoo size shares.

    Args:
        size: ``tiny`` or ``small``.

    Returns:
        The config (vocabulary and special ids from the zoo tokenizer).
    """
    _check_size(size)
    arch = ARCHITECTURES[size]
    tokenizer = build_tokenizer()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def generation_config(config: LlamaConfig) -> GenerationConfig:
    """Greedy decoding with the zoo's special ids (saved as generation_config.json).

    Args:
        config: the model config.

    Returns:
        The generation config.
    """
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )


def init_model(size: str = "tiny", seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised zoo model (float32), deterministic for a seed.

    Args:
        size: ``tiny`` or ``small``.
        seed: the init seed.

    Returns:
        The untrained model.
    """
    config = model_config(size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = generation_config(config)
    return model


def save_model(model: LlamaForCausalLM, out: str | Path) -> Path:
    """Save a zoo model with the zoo tokenizer: safetensors, config, generation config, tokenizer files.

    Args:
        model: the model.
        out: the directory (created).

    Returns:
        The directory.
    """
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    return out


def save_untrained(out: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Save a random-init zoo model + tokenizer: a loadable checkpoint for tests that need no skill.

    Args:
        out: the directory (created).
        size: ``tiny`` or ``small``.
        seed: the init seed.

    Returns:
        The directory, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
    """
    return save_model(init_model(size, seed), out)
