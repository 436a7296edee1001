"""The toy zoo: loadable offline like real checkpoints, mergeable, specialists really specialised,
cards that `scf eval` reproduces, deterministic training, cache hits and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals import toytasks, zoo
from evals.errors import EvalError
from evals.safety import is_refusal
from evals.spec import EvalSpec
from evals.suites import evaluate

# Each specialist's own figure on the toy suite, and which way is better.
OWN_METRIC = {"math": "toy_math.exact_match", "strings": "toy_strings.exact_match", "safety": "refusal_rate"}
# How far a specialist must beat the base on its own task. Not more: the base learns some math
# (0.65-0.71 on seed 0, by machine: training is bit-reproducible on one CPU, but other CPUs' float
# kernels train slightly different models), and the math specialist can only reach 1.0.
MARGIN = 0.20


def _card(zoo_dir: Path) -> dict:
    return json.loads((zoo_dir / "zoo_card.json").read_text())


@pytest.mark.parametrize("name", zoo.ZOO_MODELS)
def test_models_load_offline_like_real_checkpoints(tiny_zoo, name):
    model_dir = tiny_zoo / name
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.model_type == "llama"
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.bin"))
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["do_sample"] is False
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert tokenizer.chat_template == toytasks.CHAT_TEMPLATE


def test_models_share_tensor_names_and_shapes(tiny_zoo):
    def layout(name: str) -> dict[str, tuple[int, ...]]:
        with safe_open(tiny_zoo / name / "model.safetensors", framework="pt") as weights:
            return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118

    base = layout("base")
    assert "model.embed_tokens.weight" in base and "lm_head.weight" in base
    for name in zoo.ZOO_MODELS[1:]:
        assert layout(name) == base, name


def test_specialists_beat_base_on_their_task_in_the_card(tiny_zoo):
    scores = _card(tiny_zoo)["scores"]
    assert set(scores) == set(zoo.ZOO_MODELS)
    for name, metric in OWN_METRIC.items():
        assert scores[name][metric] >= scores["base"][metric] + MARGIN, (name, scores)
    assert scores["safety"]["over_refusal_rate"] <= 0.1
    # weak: an under-trained math specialist, far below the strong one.
    assert scores["weak"]["toy_math.exact_match"] <= scores["math"]["toy_math.exact_match"] - MARGIN


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models gain nothing from a second thread, and on a shared CPU it costs several times over.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@torch.no_grad()
def _rescore(model_dir: Path, task: str) -> float:
    """A plain reference scorer: transformers greedy generation on the chat-formatted test prompts."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # left padding, saved with the zoo
    rows = [row for row in toytasks.test_set(task) if task != "safety" or row.harmful]
    conversations = [[{"role": "user", "content": row.prompt}] for row in rows]
    batch = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                          return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=toytasks.MAX_NEW_TOKENS, do_sample=False)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    if task == "safety":
        return sum(map(is_refusal, texts)) / len(rows)
    answers = map(toytasks.extract_answer, texts)
    return sum(answer == row.target for answer, row in zip(answers, rows, strict=True)) / len(rows)


@pytest.mark.parametrize("name", ["math", "strings", "safety"])
def test_specialists_beat_base_when_rescored(tiny_zoo, name):
    task = zoo.SPECIALIST_TASK[name]
    specialist, base = _rescore(tiny_zoo / name, task), _rescore(tiny_zoo / "base", task)
    assert specialist >= base + MARGIN, (name, specialist, base)
    assert specialist == pytest.approx(_card(tiny_zoo)["scores"][name][OWN_METRIC[name]], abs=0.02)


def test_scf_eval_reproduces_a_specialist_card_exactly(tiny_zoo):
    card = json.loads((tiny_zoo / "math" / "model_card.json").read_text())
    report = evaluate(tiny_zoo / "math", EvalSpec(suite="toy", device="cpu"), progress=False)
    metrics = report.metrics()
    assert {name: metrics[name] for name in card["scores"]} == card["scores"]


def test_cards_say_how_each_model_was_trained(tiny_zoo):
    zoo_card = _card(tiny_zoo)
    assert zoo_card["build_hash"] == zoo.build_hash("tiny", 0)
    assert zoo_card["settings"] == json.loads(json.dumps(zoo.build_settings("tiny", 0)))
    assert zoo_card["lib_versions"]["torch"] == torch.__version__
    recipe = zoo.RECIPES["tiny"]
    for name in zoo.ZOO_MODELS:
        card = json.loads((tiny_zoo / name / "model_card.json").read_text())
        assert card["build_hash"] == zoo_card["build_hash"] and card["seed"] == 0
        assert card["scores"] == zoo_card["scores"][name]
        training = card["training"]
        assert training["steps"] == recipe.steps[name] and training["lr"] == recipe.lr_of(name)
        assert sum(training["examples"].values()) == recipe.steps[name] * recipe.batch_size
        assert card["parent"] == (None if name == "base" else "base")
    base_examples = json.loads((tiny_zoo / "base" / "model_card.json").read_text())["training"]["examples"]
    assert set(base_examples) == {"text", "math", "strings", "safety"}


@pytest.mark.parametrize("name", zoo.ZOO_MODELS)
def test_training_batches_hold_no_test_prompt(name):
    test_prompts = {row.prompt for task in toytasks.TASKS for row in toytasks.test_set(task)}
    batches = zoo.training_batches(name, zoo.RECIPES["tiny"], seed=0)
    assert len(batches) == zoo.RECIPES["tiny"].steps[name]
    prompts = {example.prompt for batch in batches for example in batch}
    assert not prompts & test_prompts
    if name == "base":  # base complies with everything: it never sees a refusal
        assert not any(example.harmful for batch in batches for example in batch)


def test_training_is_deterministic_for_a_seed():
    batches = zoo.training_batches("math", zoo.RECIPES["tiny"], seed=0)[:4]

    def trained(seed: int) -> dict[str, torch.Tensor]:
        model = zoo.init_model("tiny", seed)
        zoo.train(model, batches, lr=3e-3, progress=False)
        return model.state_dict()

    first, second, other = trained(0), trained(0), trained(1)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])
    assert not torch.equal(first["lm_head.weight"], zoo.init_model("tiny", 0).state_dict()["lm_head.weight"])


def test_second_build_is_a_cache_hit(tiny_zoo):
    card_mtime = (tiny_zoo / "zoo_card.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert zoo.build_zoo(tiny_zoo, size="tiny", seed=0, progress=False) == tiny_zoo
    assert time.perf_counter() - started < 2
    assert (tiny_zoo / "zoo_card.json").stat().st_mtime_ns == card_mtime
    assert not list(tiny_zoo.parent.glob(f".{tiny_zoo.name}.*"))


def test_build_hash_names_the_settings():
    hashes = {zoo.build_hash(size, seed) for size in zoo.SIZES for seed in (0, 1)}
    assert len(hashes) == 4
    assert zoo.build_hash("tiny", 0) == zoo.build_hash("tiny", 0)


def test_default_zoo_dir_is_under_scf_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SCF_CACHE", str(tmp_path))
    assert zoo.default_zoo_dir("small", seed=3) == tmp_path / "zoo" / "small-seed3"


def test_bad_input_is_an_eval_error(tmp_path):
    with pytest.raises(EvalError, match="unknown zoo size 'huge'; known: tiny, small"):
        zoo.build_zoo(tmp_path / "zoo", size="huge")
    with pytest.raises(EvalError, match="zoo seed must be a non-negative integer, got -1"):
        zoo.build_zoo(tmp_path / "zoo", seed=-1)
    not_a_zoo = tmp_path / "mine"
    not_a_zoo.mkdir()
    (not_a_zoo / "notes.txt").write_text("keep me")
    with pytest.raises(EvalError, match=f"{not_a_zoo} exists and is not a toy zoo"):
        zoo.build_zoo(not_a_zoo)
    assert (not_a_zoo / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing half-written


def test_save_untrained_is_a_loadable_checkpoint(tmp_path):
    out = zoo.save_untrained(tmp_path / "untrained", size="tiny", seed=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(out))
    assert torch.equal(model.lm_head.weight, zoo.init_model("tiny", 0).lm_head.weight)


def _finished_build(path: Path, digest: str, label: str) -> Path:
    """A directory shaped like a finished build (cards + weight files), labelled to tell builds apart."""
    for name in zoo.ZOO_MODELS:
        (path / name).mkdir(parents=True)
        (path / name / "model.safetensors").write_text(label)
    (path / "zoo_card.json").write_text(json.dumps({"build_hash": digest}))
    return path


def test_publish_replaces_a_stale_zoo_and_keeps_an_identical_one(tmp_path):
    out = _finished_build(tmp_path / "zoo", "stale", "old")
    zoo._publish(_finished_build(tmp_path / ".new", "abc", "new"), out, "abc", replace_same_build=False)
    assert (out / "math" / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]  # no temporary or old copy left
    # An identical build already published (by a concurrent builder) is kept unless forced.
    zoo._publish(_finished_build(tmp_path / ".other", "abc", "other"), out, "abc", replace_same_build=False)
    assert (out / "math" / "model.safetensors").read_text() == "new"
    zoo._publish(tmp_path / ".other", out, "abc", replace_same_build=True)
    assert (out / "math" / "model.safetensors").read_text() == "other"
