"""Vocabulary mismatches: which embedding rows are merged, which are copied, and from which input.

Real pairs often differ in their vocabulary: a fine-tune added a few special tokens (32000 vs 32002
rows), or its embedding was padded to a multiple of 64 (32064 rows for 32000 tokens). Without a
policy such a pair is an error. With ``tokenizer_source`` (mergekit's key) the embedding and the LM
head are merged over the rows every model has and the rest is copied from the model whose tokenizer
the output gets.

Rows are matched by token id, not by token string (mergekit permutes rows by token string; see
docs/merging.md for every difference). A row "is in" a model when the model has the row and its
tokenizer has a token at that id, so a padding row never counts as a token. The token strings at
the shared ids are compared: where they differ the report says so (``union`` refuses).

Tied embeddings: a model with ``tie_word_embeddings: true`` and no ``lm_head.weight``, merged with
one that has an LM head, contributes its embedding as its LM head (that is what tying means), and the
output is untied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scf.errors import ScfError
from scf.io import Checkpoint
from scf.sources import ResolvedSource, split_hub_ref

LM_HEAD = "lm_head.weight"
# Tensors with one row per token (the embedding and the LM head) under the common HF names.
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
VOCAB_SUFFIXES = (*EMBED_SUFFIXES, "lm_head.weight", "embed_out.weight")
POLICIES = ("base", "union")
_SHOWN_MISMATCHES = 5


def is_vocab_tensor(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor holds one row per token (an embedding or LM head matrix)."""
    return len(shape) == 2 and (name == LM_HEAD or name.endswith(VOCAB_SUFFIXES))


@dataclass(frozen=True)
class RowPlan:
    """How one vocabulary tensor is written.

    Attributes:
        common: rows ``[0, common)`` are merged by the method (every model has them).
        rows: rows of the output; ``[common, rows)`` are copied from ``source``.
        source: index of the input (``[base, *secondaries, reference]``) the copied rows come from.
        rows_of: each input's row count, by label.
    """

    common: int
    rows: int
    source: int
    rows_of: dict[str, int]


@dataclass
class VocabPlan:
    """The vocabulary decisions of one merge (see the module docstring).

    Attributes:
        policy: ``spec.tokenizer_source`` as given (None: no policy).
        source: index of the input whose tokenizer, generation config and extra rows the output gets.
        tensors: the row plan of each vocabulary tensor (empty without a policy).
        untied: labels of the inputs whose embedding serves as their LM head.
        token_mismatches: shared ids whose token differs between the source and another input.
    """

    policy: str | None = None
    source: int = 0
    tensors: dict[str, RowPlan] = field(default_factory=dict)
    untied: list[str] = field(default_factory=list)
    token_mismatches: list[dict[str, Any]] = field(default_factory=list)
    n_token_mismatches: int = 0

    def report(self, labels: list[str]) -> dict[str, Any]:
        """The ``vocabulary`` section of the merge report."""
        tensors = {}
        for name, rows in self.tensors.items():
            tensors[name] = {"rows": rows.rows, "rows_merged": rows.common,
                             "rows_copied": rows.rows - rows.common,
                             "copied_from": labels[rows.source] if rows.rows > rows.common else None,
                             "rows_of": rows.rows_of}
        return {"tokenizer_source": self.policy, "source": labels[self.source], "tensors": tensors,
                "untied": self.untied, "token_mismatches": self.n_token_mismatches,
                "token_mismatch_examples": self.token_mismatches}


# ------------------------------------------------------------------------------------ tied heads


def untie_heads(checkpoints: list[Checkpoint], labels: list[str]) -> list[str]:
    """Give every tied input without ``lm_head.weight`` its embedding as LM head, when another input
    has one; returns the labels of those inputs.

    Raises:
        ScfError: an input lacks ``lm_head.weight`` but does not declare tied embeddings.
    """
    if not any(LM_HEAD in c.tensors for c in checkpoints) or all(LM_HEAD in c.tensors for c in checkpoints):
        return []
    holder = labels[next(i for i, c in enumerate(checkpoints) if LM_HEAD in c.tensors)]
    untied = []
    for checkpoint, label in zip(checkpoints, labels, strict=True):
        if LM_HEAD in checkpoint.tensors:
            continue
        config = checkpoint.config() or {}
        embed = next((n for n in checkpoint.tensors if n.endswith(EMBED_SUFFIXES)), None)
        if config.get("tie_word_embeddings") is not True or embed is None:
            where = checkpoint.root / "config.json"
            raise ScfError(f"tensor {LM_HEAD!r} present in {holder} but not in {label} ({checkpoint.root}), "
                           f"and {label} does not declare tied embeddings (tie_word_embeddings: true in "
                           f"{where}, with an embedding tensor); its LM head cannot be reconstructed")
        checkpoint.tensors[LM_HEAD] = checkpoint.tensors[embed]  # `load` reads the meta's own name
        untied.append(label)
    return untied


# ------------------------------------------------------------------------------------ the policy


def token_ids(checkpoint: Checkpoint) -> dict[int, str] | None:
    """id -> token of an input's tokenizer (``tokenizer.json`` and ``added_tokens.json``), or None when
    it has no ``tokenizer.json`` (only then are its rows all taken to be tokens)."""
    directory = checkpoint.directory
    if directory is None or not (directory / "tokenizer.json").is_file():
        return None
    path = directory / "tokenizer.json"
    try:
        data = json.loads(path.read_text())
        vocab = data.get("model", {}).get("vocab") or {}
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids are positions
            ids = {i: piece[0] for i, piece in enumerate(vocab)}
        else:
            ids = {int(i): token for token, i in vocab.items()}
        ids |= {int(t["id"]): t["content"] for t in data.get("added_tokens") or []}
        added = directory / "added_tokens.json"
        if added.is_file():
            ids |= {int(i): token for token, i in json.loads(added.read_text()).items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise ScfError(f"{path}: cannot read the tokenizer's vocabulary ({reason})") from None
    return ids


def n_tokens(ids: dict[int, str] | None, rows: int) -> int:
    """Rows that are tokens: ids ``0..n-1`` of the tokenizer (all rows without a tokenizer)."""
    if ids is None:
        return rows
    n = 0
    while n < rows and n in ids:
        n += 1
    return n


def resolve_policy(policy: str, sources: list[ResolvedSource], labels: list[str],
                   tokens: list[int]) -> int:
    """The input index a ``tokenizer_source`` names (for ``union``: the input with the most tokens).

    Raises:
        ScfError: the value names no input; the message lists what is accepted.
    """
    if policy == "base":
        return 0
    if policy == "union":
        return max(range(len(tokens)), key=lambda i: (tokens[i], -i))  # ties: the earliest input
    for i, source in enumerate(sources):
        repo_id = split_hub_ref(source.ref)[0]
        local = Path(policy).expanduser()
        same_path = local.exists() and local.resolve() == source.path.resolve()
        if policy in (source.ref, repo_id, labels[i]) or same_path:
            return i
    names = ", ".join(f"{s.ref!r}" for s in sources)
    raise ScfError(f"tokenizer_source {policy!r} is not an input of this merge: use base, union, or one of "
                   f"the inputs as written ({names})")


def plan_vocab(policy: str | None, checkpoints: list[Checkpoint], sources: list[ResolvedSource],
               labels: list[str], untied: list[str]) -> VocabPlan:
    """Decide every vocabulary tensor's rows (no policy: nothing to decide, shapes must agree).

    Args:
        policy: ``tokenizer_source`` (base, union, or an input's ref or path), or None.
        checkpoints: the opened inputs, ``[base, *secondaries, reference]``.
        sources: their resolved sources.
        labels: their labels (``base``, ``secondary[i]``, ``reference``).
        untied: labels of the inputs whose LM head is their embedding (`untie_heads`).

    Returns:
        The `VocabPlan`.

    Raises:
        ScfError: the policy names no input, the source has no tokenizer files, or ``union`` meets
            vocabularies that do not extend one another.
    """
    if policy is None:
        return VocabPlan(untied=untied)
    if not policy.strip():
        raise ScfError("tokenizer_source is empty: use base, union, or one of the inputs")
    ids = [token_ids(c) for c in checkpoints]
    embed = next((n for n, m in checkpoints[0].tensors.items() if is_vocab_tensor(n, m.shape)), None)
    rows = [c.tensors[embed].shape[0] if embed and embed in c.tensors else 0 for c in checkpoints]
    tokens = [n_tokens(i, r) for i, r in zip(ids, rows, strict=True)]
    source = resolve_policy(policy, sources, labels, tokens)
    if source != 0 and not checkpoints[source].aux_files():
        raise ScfError(f"tokenizer_source {policy!r}: {labels[source]} ({checkpoints[source].root}) has no "
                       f"tokenizer or config files to copy")
    plan = VocabPlan(policy=policy, source=source, untied=untied)
    for name, meta in checkpoints[0].tensors.items():
        if is_vocab_tensor(name, meta.shape):
            plan.tensors[name] = _row_plan(name, checkpoints, labels, ids, source)
    _compare_tokens(plan, ids, labels, min((p.common for p in plan.tensors.values()), default=0))
    return plan


def _row_plan(name: str, checkpoints: list[Checkpoint], labels: list[str],
              ids: list[dict[int, str] | None], source: int) -> RowPlan:
    rows = [c.tensors[name].shape[0] for c in checkpoints]
    common = min(n_tokens(i, r) for i, r in zip(ids, rows, strict=True))
    return RowPlan(common=common, rows=rows[source], source=source,
                   rows_of=dict(zip(labels, rows, strict=True)))


def _compare_tokens(plan: VocabPlan, ids: list[dict[int, str] | None], labels: list[str],
                    common: int) -> None:
    """Record the shared ids whose token differs from the source's; ``union`` refuses them."""
    reference = ids[plan.source]
    if reference is None:
        return
    for other, label in zip(ids, labels, strict=True):
        if other is None or other is reference:
            continue
        shared = min(common, max(other, default=-1) + 1, max(reference, default=-1) + 1)
        differing = [i for i in range(shared) if other.get(i) != reference.get(i)]
        plan.n_token_mismatches += len(differing)
        plan.token_mismatches += [{"id": i, labels[plan.source]: reference.get(i), label: other.get(i)}
                                  for i in differing[:_SHOWN_MISMATCHES]]
        if differing and plan.policy == "union":
            first = differing[0]
            raise ScfError(f"tokenizer_source 'union': the vocabularies of {labels[plan.source]} and {label} "
                           f"do not extend one another (token id {first} is {reference.get(first)!r} in one, "
                           f"{other.get(first)!r} in the other, {len(differing)} ids differ); scf matches "
                           f"rows by token id and supports union only when one vocabulary extends the "
                           f"others: use tokenizer_source: base or one input's path")


def vocab_mismatch_error(name: str, base: Any, other: Any, label: str) -> ScfError:
    """The error for a vocabulary tensor whose row count differs and no ``tokenizer_source`` is set."""
    return ScfError(
        f"tensor {name!r}: vocabulary size mismatch: base has {base.shape[0]} rows ({base.file}), {label} "
        f"has {other.shape[0]} rows ({other.file}); set tokenizer_source (--tokenizer-source base, union, "
        f"or one input's path) to merge the rows every model has and copy the rest from that model")

