"""Vocabulary mismatches on real tiny checkpoints: 32000 vs 32002 rows (two added tokens), a padded
embedding (32064 rows for 32000 tokens), tied embeddings; exact rows, report, files and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_ckpt import finetune, llama_config, llama_state, run_scf, save_checkpoint

from scf.errors import ScfError
from scf.io import open_checkpoint
from scf.merge import merge
from scf.methods.base import TensorInputs
from scf.methods.registry import get_method, validate_params
from scf.spec import MergeSpec

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
VOCAB = 32000
ADDED = ["<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def _config(rows: int, **extra: object) -> dict:
    return llama_config(n_layers=1, hidden=16, intermediate=32, vocab=rows, n_heads=2, n_kv_heads=1) | extra


def _write_tokenizer(out: Path, n_words: int, added: list[str], chat_template: str | None = None) -> None:
    """A word-level tokenizer of ``n_words`` ids (``<unk> <s> </s> w3 ...``) plus ``added`` special tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, n_words)}
    added_tokens = [{"id": n_words + i, "content": token, "single_word": False, "lstrip": False,
                     "rstrip": False, "normalized": False, "special": True} for i, token in enumerate(added)]
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
                 "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
                 "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": added[-1] if added else "</s>", "unk_token": "<unk>"}
    if chat_template:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def _with_rows(state: dict[str, torch.Tensor], rows: int, seed: int) -> dict[str, torch.Tensor]:
    """``state`` with its embedding and LM head grown to ``rows`` rows (new rows random)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name in (EMBED, HEAD):
        extra = torch.randn(rows - state[name].shape[0], state[name].shape[1], generator=gen) * 0.05
        out[name] = torch.cat([state[name], extra])
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base (32000 tokens), added (fine-tune + 2 added tokens, its own eos, generation config and chat
    template), padded (fine-tune, embedding padded to 32064 rows), reference (a third relative)."""
    root = tmp_path_factory.mktemp("vocab")
    state = llama_state(_config(VOCAB), seed=3)
    base = save_checkpoint(root / "base", state, _config(VOCAB))
    added = save_checkpoint(root / "added", _with_rows(finetune(state, seed=1), VOCAB + 2, seed=5),
                            _config(VOCAB + 2, eos_token_id=VOCAB + 1))
    _write_tokenizer(added, VOCAB, ADDED, TEMPLATE)
    (added / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": VOCAB + 1,
                                                              "max_new_tokens": 7}))
    padded = save_checkpoint(root / "padded", _with_rows(finetune(state, seed=2), VOCAB + 64, seed=6),
                             _config(VOCAB + 64))
    _write_tokenizer(padded, VOCAB, [])
    reference = save_checkpoint(root / "reference", finetune(state, seed=4), _config(VOCAB))
    return {"base": base, "added": added, "padded": padded, "reference": reference}


def _load(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(path)
    return {name: checkpoint.load(name) for name in checkpoint.tensors}


def _method_on(method: str, params: dict, name: str, models: list[dict], reference: dict | None,
               rows: int) -> torch.Tensor:
    """The method called directly on the first ``rows`` rows of each model's tensor."""
    cut = [m[name][:rows] for m in models]
    inputs = TensorInputs(name, cut[0], cut[1:], None if reference is None else reference[name][:rows])
    return get_method(method).fn(inputs, validate_params(method, params, len(models)))


def test_mismatch_without_policy_is_an_error_naming_both_sizes(models: dict[str, Path],
                                                               tmp_path: Path) -> None:
    code, _, err = run_scf(["merge", "--base", str(models["base"]), "--secondary", str(models["added"]),
                            "--method", "linear", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert err == (f"error: tensor {HEAD!r}: vocabulary size mismatch: base has 32000 rows "
                   f"({models['base'] / 'model.safetensors'}), secondary[0] has 32002 rows "
                   f"({models['added'] / 'model.safetensors'}); set tokenizer_source (--tokenizer-source "
                   f"base, union, or one input's path) to merge the rows every model has and copy the rest "
                   f"from that model\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("method", "params", "with_reference"), [
    ("scf_rkl", {}, False),  # row-wise KL and exact quantiles over the whole tensor
    ("ties", {"density": 0.5, "weight": [0.6, 0.4]}, True),  # top-k by magnitude and sign election
])
def test_added_tokens_from_the_secondary(models: dict[str, Path], tmp_path: Path, method: str, params: dict,
                                         with_reference: bool) -> None:
    out = tmp_path / "out"
    argv = ["merge", "--base", str(models["base"]), "--secondary", str(models["added"]), "--method", method,
            "--tokenizer-source", str(models["added"]), "--out", str(out), "--quiet"]
    argv += [f"--set={k}={json.dumps(v)}" for k, v in params.items()]
    argv += ["--reference", str(models["reference"])] if with_reference else []
    code, stdout, _ = run_scf(argv)
    assert code == 0
    assert stdout.splitlines()[1:] == [
        f"{name}: 32002 rows, 32000 merged, 2 copied from secondary[0] (tokenizer from secondary[0])"
        for name in (HEAD, EMBED)]
    merged, base, added = _load(out), _load(models["base"]), _load(models["added"])
    reference = _load(models["reference"]) if with_reference else None
    for name in (EMBED, HEAD):
        assert merged[name].shape == (VOCAB + 2, 16)
        expected = _method_on(method, params, name, [base, added], reference, VOCAB)
        assert torch.equal(merged[name][:VOCAB], expected), name
        assert torch.equal(merged[name][VOCAB:], added[name][VOCAB:]), name
    name = "model.layers.0.mlp.up_proj.weight"  # other tensors: as without a policy
    assert torch.equal(merged[name], _method_on(method, params, name, [base, added], reference, 32))
    report = json.loads((out / "merge_report.json").read_text())
    rows_of = {"base": VOCAB, "secondary[0]": VOCAB + 2} | ({"reference": VOCAB} if with_reference else {})
    entry = {"rows": VOCAB + 2, "rows_merged": VOCAB, "rows_copied": 2, "copied_from": "secondary[0]",
             "rows_of": rows_of}
    assert report["vocabulary"] == {"tokenizer_source": str(models["added"]), "source": "secondary[0]",
                                    "tensors": {EMBED: entry, HEAD: entry}, "untied": [],
                                    "token_mismatches": 0, "token_mismatch_examples": []}
    assert report["files_from"] == {"config": "base", "tokenizer": "secondary[0]",
                                    "generation_config": "secondary[0]",
                                    "chat_template": {"from": "secondary[0]",
                                                      "file": "tokenizer_config.json"}}
    record = next(r for r in report["tensors"] if r["name"] == EMBED)
    assert record["shape"] == [VOCAB + 2, 16]
    assert record["fraction_from"]["secondary_0"] >= 2 / (VOCAB + 2)
    assert sum(record["fraction_from"].values()) == pytest.approx(1.0)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (models["added"] / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((models["base"] / "config.json").read_text()) | {
        "vocab_size": VOCAB + 2, "eos_token_id": VOCAB + 1}
    resolved = (out / "merge_config.yaml").read_text()
    assert f"tokenizer_source: {models['added']}\n" in resolved
    card = (out / "README.md").read_text()
    assert f"| `{EMBED}` | 32002 | 32000 | 2 | secondary[0] |\n" in card
    assert "| tokenizer | secondary[0] |\n| generation_config.json | secondary[0] |\n" in card
    assert "| chat template | secondary[0] (tokenizer_config.json) |\n" in card


def test_base_tokenizer_keeps_the_base_rows(models: dict[str, Path], tmp_path: Path) -> None:
    spec = MergeSpec(base=str(models["base"]), secondary=[str(models["added"])], method="linear",
                     tokenizer_source="base")
    report = merge(spec, tmp_path / "out", progress=False)
    merged, base, added = _load(tmp_path / "out"), _load(models["base"]), _load(models["added"])
    assert merged[EMBED].shape == (VOCAB, 16)
    assert torch.equal(merged[EMBED], _method_on("linear", {}, EMBED, [base, added], None, VOCAB))
    assert report["vocabulary"]["tensors"][HEAD] == {
        "rows": VOCAB, "rows_merged": VOCAB, "rows_copied": 0, "copied_from": None,
        "rows_of": {"base": VOCAB, "secondary[0]": VOCAB + 2}}
    assert report["files_from"]["tokenizer"] == "base"
    assert report["files_from"]["chat_template"] is None
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (models["base"] / name).read_bytes(), name


def test_padded_embedding(models: dict[str, Path], tmp_path: Path) -> None:
    """The padding rows are no tokens: rows 32000.. come from the source, never merged."""
    base, padded = _load(models["base"]), _load(models["padded"])
    spec = MergeSpec(base=str(models["base"]), secondary=[str(models["padded"])], method="linear",
                     tokenizer_source=str(models["padded"]))
    report = merge(spec, tmp_path / "padded", progress=False)
    merged = _load(tmp_path / "padded")
    assert merged[EMBED].shape == (VOCAB + 64, 16)
    assert torch.equal(merged[EMBED][:VOCAB], _method_on("linear", {}, EMBED, [base, padded], None, VOCAB))
    assert torch.equal(merged[EMBED][VOCAB:], padded[EMBED][VOCAB:])
    assert report["vocabulary"]["tensors"][EMBED]["rows_copied"] == 64
    assert json.loads((tmp_path / "padded" / "config.json").read_text())["vocab_size"] == VOCAB + 64
    # the padded model as base, the unpadded tokenizer: 32000 rows, all merged
    spec = MergeSpec(base=str(models["padded"]), secondary=[str(models["base"])], method="linear",
                     tokenizer_source=str(models["base"]))
    merge(spec, tmp_path / "unpadded", progress=False)
    merged = _load(tmp_path / "unpadded")
    assert torch.equal(merged[HEAD], _method_on("linear", {}, HEAD, [padded, base], None, VOCAB))
    assert json.loads((tmp_path / "unpadded" / "config.json").read_text())["vocab_size"] == VOCAB


def test_union(models: dict[str, Path], tmp_path: Path) -> None:
    """union: the vocabulary that extends the others (here the one with the added tokens)."""
    spec = MergeSpec(base=str(models["padded"]), secondary=[str(models["added"])], method="linear",
                     tokenizer_source="union")
    report = merge(spec, tmp_path / "out", progress=False)
    assert report["vocabulary"]["source"] == "secondary[0]"
    assert _load(tmp_path / "out")[EMBED].shape == (VOCAB + 2, 16)
    tokenizer = (tmp_path / "out" / "tokenizer.json").read_bytes()
    assert tokenizer == (models["added"] / "tokenizer.json").read_bytes()


def test_union_of_conflicting_vocabularies_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (other / name).write_bytes((models["added"] / name).read_bytes())
    _write_tokenizer(other, VOCAB, ["<tool>", "</tool>"])
    spec = MergeSpec(base=str(models["added"]), secondary=[str(other)], method="linear",
                     tokenizer_source="union")
    with pytest.raises(ScfError) as err:
        merge(spec, tmp_path / "out", progress=False)
    assert str(err.value) == (
        "tokenizer_source 'union': the vocabularies of base and secondary[0] do not extend one another "
        "(token id 32000 is '<|im_start|>' in one, '<tool>' in the other, 2 ids differ); scf matches rows by "
        "token id and supports union only when one vocabulary extends the others: use tokenizer_source: base "
        "or one input's path")
    # with base's tokenizer the merge goes ahead and the report says which ids differ
    spec = spec.model_copy(update={"tokenizer_source": "base"})
    report = merge(spec, tmp_path / "out", progress=False)
    assert report["vocabulary"]["token_mismatches"] == 2
    assert report["vocabulary"]["token_mismatch_examples"][0] == {
        "id": 32000, "base": "<|im_start|>", "secondary[0]": "<tool>"}


def test_unknown_tokenizer_source(models: dict[str, Path], tmp_path: Path) -> None:
    spec = MergeSpec(base=str(models["base"]), secondary=[str(models["added"])], method="linear",
                     tokenizer_source="org/elsewhere")
    with pytest.raises(ScfError, match=r"^tokenizer_source 'org/elsewhere' is not an input of this merge: "
                                       r"use base, union, or one of the inputs as written \("):
        merge(spec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tied_embeddings(tmp_path: Path) -> None:
    """A tied base (no lm_head.weight) merged with an untied secondary: its embedding is its LM head."""
    config = _config(128)
    state = llama_state(config, seed=8)
    tied_state = {k: v for k, v in state.items() if k != HEAD}
    tied = save_checkpoint(tmp_path / "tied", tied_state, config | {"tie_word_embeddings": True})
    untied = save_checkpoint(tmp_path / "untied", finetune(state, seed=9), config)
    spec = MergeSpec(base=str(tied), secondary=[str(untied)], method="linear")
    report = merge(spec, tmp_path / "out", progress=False)
    merged, sec = _load(tmp_path / "out"), _load(untied)
    assert torch.equal(merged[HEAD], (0.5 * state["model.embed_tokens.weight"] + 0.5 * sec[HEAD]))
    assert report["vocabulary"]["untied"] == ["base"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    from transformers import AutoModelForCausalLM  # untied on load too: its head is the merged head

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model.get_output_embeddings().weight.detach(), merged[HEAD])
    assert not torch.equal(model.get_input_embeddings().weight.detach(), merged[HEAD])
    # the other way round: the untied model as base, the tied one's embedding as its head
    report = merge(MergeSpec(base=str(untied), secondary=[str(tied)], method="linear"), tmp_path / "rev",
                   progress=False)
    assert torch.equal(_load(tmp_path / "rev")[HEAD], merged[HEAD])
    assert report["vocabulary"]["untied"] == ["secondary[0]"]
    # without tie_word_embeddings the missing head is an error naming the model and the key
    (tmp_path / "tied" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScfError) as err:
        merge(spec, tmp_path / "out2", progress=False)
    assert str(err.value) == (
        f"tensor 'lm_head.weight' present in secondary[0] but not in base ({tied}), and base does not "
        f"declare tied embeddings (tie_word_embeddings: true in {tied / 'config.json'}, with an embedding "
        f"tensor); its LM head cannot be reconstructed")


def test_merged_model_loads_and_generates(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = MergeSpec(base=str(models["base"]), secondary=[str(models["added"])], method="linear",
                     tokenizer_source=str(models["added"]))
    merge(spec, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape == (VOCAB + 2, 16)
    assert len(tokenizer) == VOCAB + 2 and tokenizer.eos_token_id == VOCAB + 1
    ids = tokenizer("<|im_start|> w5 w7", return_tensors="pt").input_ids
    assert ids.tolist() == [[VOCAB, 5, 7]]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert generated.shape == (1, 7)
    assert model.generation_config.max_new_tokens == 7  # the source's generation config
