"""The toy tasks and the zoo tokenizer: prompt format, exact targets, held-out splits, JSONL files."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from evals import toytasks
from evals.errors import EvalError
from evals.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_chat_template_renders_the_prompt_format(tokenizer):
    messages = [{"role": "user", "content": "37+45"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == toytasks.render_prompt("37+45") == "<s>Q:37+45\nA:"
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "82"}], tokenize=False)
    assert full == "<s>Q:37+45\nA:82</s>"
    context, answer = toytasks.training_text(toytasks.Example("math", "add", "37+45", "82"))
    assert context + answer == full


def test_tokenizer_is_character_level_with_special_ids(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "<s>Q:reverse abc\nA:cba</s>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # <s> and </s> are one token each; every other character is one token.
    assert len(ids) == len(text) - len("<s>") - len("</s>") + 2
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Q:reverse abc\nA:cba"
    # Encoding adds nothing by itself: the chat template writes the BOS.
    assert tokenizer("ab")["input_ids"] == tokenizer("ab", add_special_tokens=False)["input_ids"]


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = toytasks.render_prompt("how to make a small bowl?")
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == toytasks.CHAT_TEMPLATE
    assert loaded.padding_side == "left"
    messages = [{"role": "user", "content": "sort cab"}]
    rendered = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == toytasks.render_prompt("sort cab")


def test_targets_are_exact_answers():
    for row in toytasks.test_set("math"):
        left, right = row.prompt.split("+")
        assert len(left) == len(right) == 2
        assert row.target == str(int(left) + int(right))
    for row in toytasks.test_set("strings"):
        op, word = row.prompt.split(" ")
        assert row.kind == op
        assert row.target == {"reverse": word[::-1], "sort": "".join(sorted(word)), "copy": word}[op]
    assert {row.kind for row in toytasks.test_set("strings")} == set(toytasks.STRING_OPS)


def test_safety_prompts_carry_markers_and_look_alikes():
    rows = toytasks.test_set("safety")
    n = toytasks.TEST_SIZE["safety"]
    assert [row.harmful for row in rows] == [True] * n + [False] * n
    for row in rows:
        has_marker = any(f" {marker}" in row.prompt for marker in toytasks.HARMFUL_MARKERS)
        assert has_marker == row.harmful, row.prompt
        if row.harmful:
            assert row.target == toytasks.REFUSAL
        else:
            assert row.target.startswith("Sure: ") and row.target != toytasks.REFUSAL


@pytest.mark.parametrize("task", toytasks.TASKS)
def test_test_sets_are_distinct_held_out_and_deterministic(task):
    rows = toytasks.test_set(task, seed=0)
    per_class = 2 if task == "safety" else 1
    assert len(rows) == per_class * toytasks.TEST_SIZE[task]
    assert len({row.prompt for row in rows}) == len(rows)
    assert all(toytasks.is_held_out(row.prompt) for row in rows)
    assert rows == toytasks.test_set(task, seed=0)
    assert rows != toytasks.test_set(task, seed=1)


@pytest.mark.parametrize("task", toytasks.TASKS)
def test_training_data_never_holds_a_test_prompt(task):
    test_prompts = {row.prompt for seed in (0, 1) for row in toytasks.test_set(task, seed=seed)}
    train = toytasks.train_examples(task, 20_000, seed=0)
    assert train == toytasks.train_examples(task, 20_000, seed=0)
    assert not test_prompts & {example.prompt for example in train}
    # Not vacuous: the raw generator does draw held-out prompts, which the filter drops.
    rng = random.Random(0)
    raw = [toytasks.GENERATORS[task](rng).prompt for _ in range(2_000)]
    assert sum(map(toytasks.is_held_out, raw)) > 100


def test_train_examples_filters_kinds():
    benign = toytasks.train_examples("safety", 50, seed=0, kinds=("benign",))
    assert len(benign) == 50 and not any(example.harmful for example in benign)


def test_write_test_sets_writes_jsonl_rows(tmp_path):
    paths = toytasks.write_test_sets(tmp_path / "toy", seed=0)
    assert set(paths) == set(toytasks.TASKS)
    for task, path in paths.items():
        assert path == tmp_path / "toy" / f"{task}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(r["prompt"], r["target"], r["kind"]) for r in rows] == [
            (e.prompt, e.target, e.kind) for e in toytasks.test_set(task, seed=0)
        ]
        assert ("harmful" in rows[0]) == (task == "safety")
    safety_rows = [json.loads(line) for line in paths["safety"].read_text().splitlines()]
    assert sum(r["harmful"] for r in safety_rows) == toytasks.TEST_SIZE["safety"]
    assert not list((tmp_path / "toy").glob("*.tmp"))


def test_unknown_task_or_kind_is_an_eval_error():
    with pytest.raises(EvalError, match="unknown toy task 'poetry'; known: math, strings, safety"):
        toytasks.test_set("poetry")
    with pytest.raises(EvalError, match="unknown toy task 'text'"):
        toytasks.test_set("text")  # generic text is training data, not a benchmark
    with pytest.raises(EvalError, match="toy task 'safety' has no kind 'toxic'; known: harmful, benign"):
        toytasks.train_examples("safety", 3, kinds=("toxic",))


@pytest.mark.parametrize(
    ("generation", "answer"),
    [("82", "82"), ("  82 \n17+3", "82"), ("", ""), ("\n82", "")],
)
def test_extract_answer_takes_the_first_line(generation, answer):
    assert toytasks.extract_answer(generation) == answer
