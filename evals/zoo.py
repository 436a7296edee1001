"""The toy model zoo: tiny Llama-architecture models trained here on CPU, saved like real checkpoints.

``base`` is trained long on generic toy text plus some of every task (benign safety prompts only, so
it complies with everything, like a pretrained model); the specialists are fine-tuned from it on
their task only: ``math``, ``strings``, ``safety`` and ``weak`` (a deliberately under-trained math
specialist, for strong-weak merges). All share the tokenizer and architecture, so they merge. Like
real fine-tunes, the specialists are short lower-learning-rate runs, small deltas on a common
ancestor, so merges of them show real differences between methods.

Layout of a zoo directory::

    <out>/zoo_card.json               build hash, settings, every model x every metric
    <out>/<model>/model.safetensors   + config.json, generation_config.json, tokenizer files
    <out>/<model>/model_card.json     how it was trained and its scores

Example:
    >>> zoo = build_zoo(default_zoo_dir("tiny"), size="tiny")  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(zoo / "math")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from evals import toytasks
from evals.errors import EvalError
from evals.tokenizer import build_tokenizer
from evals.toytasks import Example

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
    max_position_embeddings: int = 512  # RoPE: no weights; room for long (looping) generations


ARCHITECTURES = {
    "tiny": Architecture(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
    "small": Architecture(hidden_size=96, intermediate_size=288, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2),
}


# Bump when the data, the recipe's meaning, the training code or the cards change: it invalidates
# built zoos.
ZOO_VERSION = 3
# Training runs on this many CPU threads whatever the machine: results depend on the reduction
# order, so a fixed count makes two builds bit-identical; one thread also never oversubscribes a
# shared CPU (two threads on a busy 2-core box were ~4x slower than one).
ZOO_THREADS = 1
# The base model's mixture, as shares of its batches (each batch holds one task, so short math
# batches are not padded to the length of safety prompts). Safety: benign prompts only. Enough of
# each task that base is a plausible common ancestor (it knows the format and some of each skill),
# little enough that every specialist still adds 30 points or more on its own task.
BASE_MIXTURE = (("text", 0.45), ("math", 0.2), ("strings", 0.15), ("safety", 0.2))
BASE_KINDS = {"safety": ("benign",)}
SPECIALIST_TASK = {"math": "math", "strings": "strings", "safety": "safety", "weak": "math"}


@dataclass(frozen=True)
class Recipe:
    """How the models of one zoo size are trained (AdamW, warmup then cosine decay to 10%).

    Attributes:
        batch_size: examples per step.
        lr: peak learning rate of the base model's pretraining.
        finetune_lr: peak learning rate of the specialists' fine-tuning from base (small: small deltas).
        steps: optimiser steps per model (``weak`` is the under-trained one).
    """

    batch_size: int
    lr: float
    finetune_lr: float
    steps: dict[str, int] = field(default_factory=dict)

    def lr_of(self, name: str) -> float:
        """The peak learning rate a zoo model is trained with.

        Args:
            name: a zoo model name.

        Returns:
            ``lr`` for ``base``, ``finetune_lr`` for a specialist.
        """
        return self.lr if name == "base" else self.finetune_lr


# Like real fine-tunes, the specialists are short, lower-LR runs from a well-trained base: their
# deltas stay small, the regime in which weight-space merging works. (Specialists trained long at
# a high LR from an under-trained base drifted so far that every merge scored ~0.)
RECIPES = {
    "tiny": Recipe(batch_size=32, lr=3e-3, finetune_lr=2e-3,
                   steps={"base": 1500, "math": 300, "strings": 250, "safety": 100, "weak": 15}),
    "small": Recipe(batch_size=32, lr=3e-3, finetune_lr=2e-3,
                    steps={"base": 1800, "math": 300, "strings": 250, "safety": 100, "weak": 15}),
}
OPTIMIZER = {"name": "AdamW", "betas": (0.9, 0.98), "weight_decay": 0.01, "clip_grad_norm": 1.0}
WARMUP_SHARE = 0.05
# How the cards' scores are computed: `scf eval MODEL --suite toy --device cpu` gives the same numbers.
SCORING = {"function": "evals.suites.evaluate", "suite": "toy", "device": "cpu", "toy_seed": 0,
           "decoding": "greedy", "max_new_tokens": toytasks.MAX_NEW_TOKENS}
CARD_METRICS = ("toy_math.exact_match", "toy_strings.exact_match", "refusal_rate", "over_refusal_rate",
                "repetition_rate")


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
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
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


def default_zoo_dir(size: str = "tiny", seed: int = 0) -> Path:
    """Where a zoo lives by default: ``$SCF_CACHE/zoo/<size>-seed<seed>``.

    Args:
        size: ``tiny`` or ``small``.
        seed: the zoo seed.

    Returns:
        The directory (``$SCF_CACHE`` defaults to ``~/.cache/scf-pipeline``).
    """
    _check_size(size)
    cache = Path(os.environ.get("SCF_CACHE", Path.home() / ".cache" / "scf-pipeline")).expanduser()
    return cache / "zoo" / f"{size}-seed{seed}"


def build_settings(size: str = "tiny", seed: int = 0) -> dict:
    """Everything a zoo build depends on (its hash names the build).

    Args:
        size: ``tiny`` or ``small``.
        seed: the zoo seed.

    Returns:
        A JSON-serialisable dict.
    """
    _check_size(size)
    return {
        "zoo_version": ZOO_VERSION,
        "size": size,
        "seed": seed,
        "architecture": asdict(ARCHITECTURES[size]),
        "recipe": asdict(RECIPES[size]),
        "optimizer": OPTIMIZER,
        "warmup_share": WARMUP_SHARE,
        "base_mixture": BASE_MIXTURE,
        "threads": ZOO_THREADS,
        "test_size": toytasks.TEST_SIZE,
    }


def build_hash(size: str = "tiny", seed: int = 0) -> str:
    """sha256 of the canonical JSON of :func:`build_settings`.

    Args:
        size: ``tiny`` or ``small``.
        seed: the zoo seed.

    Returns:
        The hex digest.
    """
    canonical = json.dumps(build_settings(size, seed), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def build_zoo(
    out: str | Path, size: str = "tiny", seed: int = 0, *, progress: bool = True, force: bool = False
) -> Path:
    """Build (train and score) the toy zoo into ``out``, or return at once when it is already there.

    The zoo is built in a temporary sibling directory and renamed into place, so ``out`` never holds
    half a zoo. A directory whose ``zoo_card.json`` carries the same build hash is reused.

    Args:
        out: the zoo directory.
        size: ``tiny`` (for tests, about a minute) or ``small`` (better scores, a few minutes).
        seed: seeds weight init and data.
        progress: show tqdm bars (one per model).
        force: rebuild even when ``out`` holds this build.

    Returns:
        ``out``: ``out/<model>`` for each of :data:`ZOO_MODELS`, and ``out/zoo_card.json``.

    Raises:
        EvalError: unknown size, negative seed, or ``out`` is an existing directory that is not a zoo.
    """
    _check_size(size)
    if not isinstance(seed, int) or seed < 0:
        raise EvalError(f"zoo seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    digest = build_hash(size, seed)
    if not force and _is_built(out, digest):
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "zoo_card.json").exists())):
        raise EvalError(f"{out} exists and is not a toy zoo (no zoo_card.json); choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build_into(tmp, size, seed, digest, progress)
        _publish(tmp, out, digest, replace_same_build=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_built(out: Path, digest: str) -> bool:
    card_path = out / "zoo_card.json"
    if not card_path.is_file():
        return False
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError:
        return False
    complete = all((out / name / "model.safetensors").is_file() for name in ZOO_MODELS)
    return card.get("build_hash") == digest and complete


def _publish(tmp: Path, out: Path, digest: str, *, replace_same_build: bool) -> None:
    """Move a finished build into place by renames; unless forced, keep an identical build that a
    concurrent builder (another test session, say) published first."""
    if not replace_same_build and _is_built(out, digest):
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if not _is_built(out, digest):  # lost the race to an identical build: fine; else a real error
            raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _build_environment() -> Iterator[None]:
    """Fixed torch threads, and no library progress bars (writing weights, loading test sets): the
    zoo's own bars (one per model, one for scoring) say where the build is."""
    import datasets
    import transformers

    previous_threads = torch.get_num_threads()
    transformers_bars = transformers.utils.logging.is_progress_bar_enabled()
    datasets_bars = not datasets.utils.are_progress_bars_disabled()
    torch.set_num_threads(ZOO_THREADS)
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        if transformers_bars:
            transformers.utils.logging.enable_progress_bar()
        if datasets_bars:
            datasets.utils.enable_progress_bars()


def _build_into(tmp: Path, size: str, seed: int, digest: str, progress: bool) -> None:
    """Train every zoo model into ``tmp``, score them, write the cards."""
    started = time.perf_counter()
    with _build_environment():
        trained = _train_all(tmp, size, seed, progress)
        models = tqdm(ZOO_MODELS, desc="zoo: scoring", disable=not progress, leave=False)
        scores = {name: score_model(tmp / name) for name in models}
    _write_cards(tmp, size, seed, digest, trained, scores, seconds=time.perf_counter() - started)


def _train_all(tmp: Path, size: str, seed: int, progress: bool) -> dict[str, dict]:
    """Train and save base, then each specialist from base's weights; returns each model's training facts."""
    recipe = RECIPES[size]
    model = init_model(size, seed)
    trained = {"base": _train_and_save(model, "base", recipe, seed, tmp, progress)}
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for name in ZOO_MODELS[1:]:
        model.load_state_dict(base_state)  # every specialist starts from the same base weights
        trained[name] = _train_and_save(model, name, recipe, seed, tmp, progress)
    return trained


def _write_cards(
    tmp: Path, size: str, seed: int, digest: str, trained: dict, scores: dict, seconds: float
) -> None:
    from evals.suites import lib_versions  # lm-eval behind it: import only when building

    for name in ZOO_MODELS:
        card = {
            "model": name,
            "zoo_size": size,
            "seed": seed,
            "build_hash": digest,
            "parent": None if name == "base" else "base",
            "task": "mixture" if name == "base" else SPECIALIST_TASK[name],
            "architecture": asdict(ARCHITECTURES[size]),
            "training": trained[name],
            "scores": scores[name],
            "scored_with": SCORING,
        }
        _write_json(tmp / name / "model_card.json", card)
    zoo_card = {
        "build_hash": digest,
        "settings": build_settings(size, seed),
        "models": list(ZOO_MODELS),
        "scores": scores,
        "scored_with": SCORING,
        "seconds": round(seconds, 1),
        "lib_versions": lib_versions("transformers"),
    }
    _write_json(tmp / "zoo_card.json", zoo_card)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def training_batches(name: str, recipe: Recipe, seed: int) -> list[list[Example]]:
    """The batches a zoo model is trained on, in order (deterministic for the seed).

    Args:
        name: a zoo model name.
        recipe: the size's recipe.
        seed: the zoo seed.

    Returns:
        ``steps`` batches of ``batch_size`` examples; each batch holds one task.
    """
    steps, size = recipe.steps[name], recipe.batch_size
    if name != "base":
        examples = toytasks.train_examples(SPECIALIST_TASK[name], steps * size, seed)
        return [examples[i * size : (i + 1) * size] for i in range(steps)]
    batches: list[list[Example]] = []
    counts = [round(share * steps) for _, share in BASE_MIXTURE]
    counts[0] += steps - sum(counts)  # rounding remainder goes to generic text
    for (task, _), count in zip(BASE_MIXTURE, counts, strict=True):
        examples = toytasks.train_examples(task, count * size, seed, kinds=BASE_KINDS.get(task))
        batches += [examples[i * size : (i + 1) * size] for i in range(count)]
    random.Random(f"scf-zoo/base/{seed}").shuffle(batches)
    return batches


def _train_and_save(
    model: LlamaForCausalLM, name: str, recipe: Recipe, seed: int, tmp: Path, progress: bool
) -> dict:
    started = time.perf_counter()
    batches = training_batches(name, recipe, seed)
    final_loss = train(model, batches, lr=recipe.lr_of(name), desc=f"zoo: {name}", progress=progress)
    save_model(model, tmp / name)
    examples: dict[str, int] = {}
    for batch in batches:
        examples[batch[0].task] = examples.get(batch[0].task, 0) + len(batch)
    return {
        "steps": len(batches),
        "batch_size": recipe.batch_size,
        "lr": recipe.lr_of(name),
        "optimizer": OPTIMIZER,
        "schedule": f"linear warmup over {WARMUP_SHARE:.0%} of steps, then cosine decay to 10% of lr",
        "loss": "cross-entropy on answer tokens (and EOS) only",
        "examples": examples,
        "seed": seed,
        "final_loss": round(final_loss, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def train(model: LlamaForCausalLM, batches: list[list[Example]], *, lr: float, desc: str = "train",
          progress: bool = True) -> float:
    """Train a model in place on batches of examples, one optimiser step per batch.

    Args:
        model: the model (left in eval mode).
        batches: the batches, in order.
        lr: peak learning rate (warmup, then cosine decay to 10%).
        desc: progress bar label.
        progress: show a tqdm bar.

    Returns:
        The last batch's loss.
    """
    steps = len(batches)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=OPTIMIZER["betas"], weight_decay=OPTIMIZER["weight_decay"]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
    encoded = iter(_encode(batches))
    device = model.device
    model.train()
    loss = torch.zeros(())
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        input_ids, labels = next(encoded)
        loss = model(input_ids=input_ids.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["clip_grad_norm"])
        optimizer.step()
        scheduler.step()
    model.eval()
    return float(loss.item())


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, round(WARMUP_SHARE * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _encode(batches: list[list[Example]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch: right-padded input ids [batch, length] and labels (-100 off the answer)."""
    tokenizer = build_tokenizer()
    for batch in batches:
        pairs = [toytasks.training_text(example) for example in batch]
        contexts = tokenizer([c for c, _ in pairs], add_special_tokens=False)["input_ids"]
        answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
        length = max(len(c) + len(a) for c, a in zip(contexts, answers, strict=True))
        # Right padding needs no attention mask: causal attention never looks ahead at the pads.
        input_ids = torch.full((len(batch), length), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        for row, (context, answer) in enumerate(zip(contexts, answers, strict=True)):
            end = len(context) + len(answer)
            input_ids[row, :end] = torch.tensor(context + answer)
            labels[row, len(context) : end] = torch.tensor(answer)
        yield input_ids, labels


def score_model(model_dir: str | Path) -> dict[str, float]:
    """Score a model on the toy suite through the same path as ``scf eval --suite toy --device cpu``.

    Args:
        model_dir: a model directory.

    Returns:
        ``{metric: value}`` for :data:`CARD_METRICS`.
    """
    from evals.spec import EvalSpec  # lm-eval behind it: import only when scoring
    from evals.suites import evaluate

    spec = EvalSpec(suite=SCORING["suite"], device=SCORING["device"], toy_seed=SCORING["toy_seed"],
                    keep_samples=False)
    metrics = evaluate(model_dir, spec, progress=False).metrics()
    return {name: metrics[name] for name in CARD_METRICS}
