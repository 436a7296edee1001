"""Tiny random Llama-shaped checkpoints written as real safetensors directories, for tests.

`llama_state` makes the tensors (Llama names and shapes), `finetune` derives a "fine-tuned"
relative (small heavy-tailed deltas), and `save_checkpoint` writes config.json,
generation_config.json, a tokenizer and the weights, single-file or sharded with an index.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_config(n_layers: int = 2, hidden: int = 32, intermediate: int = 64, vocab: int = 128,
                 n_heads: int = 4, n_kv_heads: int = 2, model_type: str = "llama") -> dict:
    """A HF-style Llama config.json for the shapes `llama_state` makes."""
    return {
        "architectures": ["LlamaForCausalLM" if model_type == "llama" else "MistralForCausalLM"],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": hidden // n_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def llama_state(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors with Llama's names and shapes for ``config``."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.05).to(dtype)

    state = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": rand(hidden, hidden),
            p + "self_attn.k_proj.weight": rand(kv, hidden),
            p + "self_attn.v_proj.weight": rand(kv, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": (1 + rand(hidden)).to(dtype),
            p + "post_attention_layernorm.weight": (1 + rand(hidden)).to(dtype),
        }
    state["model.norm.weight"] = (1 + rand(hidden)).to(dtype)
    state["lm_head.weight"] = rand(vocab, hidden)
    return state


def finetune(state: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A relative of ``state``: every tensor plus a small heavy-tailed (Student-t) delta."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        normal = torch.randn(tensor.shape, generator=gen)
        chi = torch.randn((3, *tensor.shape), generator=gen).pow(2).mean(0).sqrt()  # t with 3 dof
        out[name] = (tensor.float() + scale * normal / chi).to(tensor.dtype)
    return out


def save_checkpoint(out: Path, state: dict[str, torch.Tensor], config: dict | None = None,
                    shard_size: int | None = None, tokenizer: bool = True) -> Path:
    """Write a model directory: weights (sharded when ``shard_size`` bytes is exceeded), config, tokenizer.

    Args:
        out: the directory to create.
        state: tensor name -> tensor.
        config: config.json content (None: no config).
        shard_size: largest shard in bytes; None writes a single model.safetensors.
        tokenizer: also write tokenizer.json, tokenizer_config.json, generation_config.json.

    Returns:
        ``out``.
    """
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shard_size is not None and shards[-1] and filled + size > shard_size:
            shards.append({})
            filled = 0
        shards[-1][name] = tensor.contiguous()
        filled += size
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, file)
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        vocab_size = config["vocab_size"] if config else 16
        _write_tokenizer(out, vocab_size)
    return out


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json (vocab ``<unk> <s> </s> w3 w4 ...``) plus its small config files."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def make_pair(root: Path, *, seed: int = 0, shard_size: int | None = None, dtype: torch.dtype = torch.float32,
              n_secondaries: int = 1, **config_kwargs: int) -> tuple[Path, list[Path]]:
    """A base and ``n_secondaries`` fine-tuned relatives under ``root``; returns their directories."""
    config = llama_config(**config_kwargs)
    base_state = llama_state(config, seed=seed, dtype=dtype)
    base = save_checkpoint(root / "base", base_state, config, shard_size)
    secondaries = [
        save_checkpoint(root / f"sec{i}", finetune(base_state, seed=seed + 100 + i), config, shard_size)
        for i in range(n_secondaries)
    ]
    return base, secondaries


def run_scf(argv: list[str]) -> tuple[int, str, str]:
    """Run the ``scf`` command in-process; returns (exit code, stdout, stderr).

    Uses ``flows.cli.main`` (the real entry point) once every subcommand module it composes
    exists; until then, a parser with only ``scf.cli`` and the same error handling.
    """
    import contextlib
    import importlib.util
    import io
    import sys

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if all(importlib.util.find_spec(m) for m in ("evals.cli", "flows.pipeline_cli")):
                from flows.cli import main

                code = main(argv)
            else:
                code = _scf_only_main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    sys.stderr.write(err.getvalue())  # keep it visible in pytest's report on failure
    return code, out.getvalue(), err.getvalue()


def _scf_only_main(argv: list[str]) -> int:
    """flows.cli.main restricted to the merge subcommands (same `error: ...` / exit 2 contract)."""
    import argparse
    import sys

    from scf import cli
    from scf.errors import ScfError

    parser = argparse.ArgumentParser(prog="scf")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ScfError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
