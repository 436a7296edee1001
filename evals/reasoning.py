"""Reasoning benchmarks through lm-eval (`lm_eval.simple_evaluate`), scored for repetition too.

lm-eval runs on the model our backend already loaded (`Backend.lm_eval_model`: lm-eval's "hf"
model around the transformers one, or `VLLMBackendLM` on the vLLM engine), with the same decoding
settings and `log_samples=True`, so every generation comes back and is scored for repetition: one
generation pass serves both. lm-eval returns text only, so the text is
tokenized back to ids with the model's tokenizer, and a generation counts as truncated when it has
`max_new_tokens` tokens or more.

Items: each logged document becomes one `Sample` whose `item_id` is lm-eval's doc_id plus a hash of
the document itself (not of the rendered prompt, which holds the chat template and few-shot
examples), and whose `scores` hold the document's value of every metric under every filter. An
`ItemSlice` runs only some documents of each task, through `simple_evaluate(samples=...)`: the
tasks are loaded once here, to count their documents, and handed to lm-eval as loaded objects.

Toy benchmarks (`toy_math`, `toy_strings`) are lm-eval YAML tasks shipped in `evals/lm_tasks/`;
`prepare_toy_tasks` writes the held-out test sets and copies of the YAML files, with absolute
data paths, to a cache directory, and lm-eval loads them from there with
`TaskManager(include_path=...)`, offline. Real benchmarks use lm-eval's standard task names.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from evals import toytasks
from evals.errors import EvalError
from evals.repetition import score_sample
from evals.spec import BenchmarkScore, GenParams, ItemSlice, LoopThresholds, Sample, item_id, item_positions

TOY_TASK_FILES = {"toy_math": "math", "toy_strings": "strings"}  # task -> toytasks task
# Closed-form stderr for mean metrics needs no resampling; other aggregations get this many.
BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class LmEvalRun:
    """What one lm-eval run produced.

    Attributes:
        scores: one BenchmarkScore per (requested task or group, metric, filter), over the items run.
        samples: one per item: its generation, repetition figures, correctness and per-item scores.
        config: the resolved lm-eval settings (model args, gen kwargs, task configs' versions).
    """

    scores: list[BenchmarkScore]
    samples: list[Sample]
    config: dict


def default_cache_dir() -> Path:
    """Where toy task files are written: $SCF_CACHE/lm_tasks (default ~/.cache/scf-pipeline)."""
    return Path(os.environ.get("SCF_CACHE", Path.home() / ".cache" / "scf-pipeline")) / "lm_tasks"


def prepare_toy_tasks(out_dir: Path | None = None, seed: int = 0) -> Path:
    """Write the toy test sets and their lm-eval YAML files (absolute data paths) to a directory.

    Without `out_dir` the files go to a cache directory named by the seed and a hash of their
    content, published by an atomic rename: concurrent evaluations never see half-written files,
    and a change to the tasks gets a new directory.

    Args:
        out_dir: the directory to write (default: under `default_cache_dir()`).
        seed: the toy data seed (`evals.toytasks.write_test_sets`).

    Returns:
        The directory, to pass as `TaskManager(include_path=...)`.
    """
    if out_dir is not None:
        data = toytasks.write_test_sets(out_dir, seed=seed)
        _write_task_yamls(Path(out_dir), {task: path.resolve() for task, path in data.items()})
        return Path(out_dir)
    cache = default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".toy-", dir=cache))
    try:
        data = toytasks.write_test_sets(tmp, seed=seed)
        digest = hashlib.sha256()
        for path in [*sorted(data.values()), *_task_templates()]:
            digest.update(path.read_bytes())
        final = cache / f"toy-seed{seed}-{digest.hexdigest()[:12]}"
        if not final.is_dir():
            _write_task_yamls(tmp, {task: final / path.name for task, path in data.items()})
            with contextlib.suppress(OSError):  # another process published the same files first
                tmp.rename(final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _task_templates() -> list:
    return sorted(
        (entry for entry in resources.files("evals.lm_tasks").iterdir() if entry.name.endswith(".yaml")),
        key=lambda entry: entry.name,
    )


def _write_task_yamls(out_dir: Path, data: dict[str, Path]) -> None:
    """Copy the task YAML files into `out_dir`, pointing each task at its test set's absolute path."""
    for entry in _task_templates():
        config = yaml.safe_load(entry.read_text())
        if (config.get("dataset_kwargs") or {}).get("data_files"):
            # lm-eval resolves relative data_files against the working directory: pin them.
            config["dataset_kwargs"]["data_files"] = {"test": str(data[TOY_TASK_FILES[config["task"]]])}
        (out_dir / entry.name).write_text(yaml.safe_dump(config, sort_keys=False))


def quiet_lm_eval() -> None:
    """Hide lm-eval's warnings about our explicit choices (gen_kwargs "from the cli", a preloaded model)."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def gen_kwargs(gen: GenParams) -> dict:
    """lm-eval generation kwargs from our settings (they override the tasks' own, except `until`).

    Args:
        gen: decoding settings.

    Returns:
        Explicit values for every setting we control.
    """
    kwargs = {
        "max_gen_toks": gen.max_new_tokens,
        "do_sample": not gen.greedy,
        "temperature": gen.temperature,
        "repetition_penalty": gen.repetition_penalty,
    }
    if not gen.greedy:
        kwargs["top_p"] = gen.top_p
    return kwargs


def run_lm_eval(
    lm,
    tasks: Sequence[str],
    *,
    gen: GenParams,
    limit: int | None,
    items: ItemSlice | None = None,
    loop: LoopThresholds,
    chat_template: bool,
    tokenizer,
    device: str,
    include_path: Path | None = None,
    include_defaults: bool = True,
    unsafe_code: bool = False,
) -> LmEvalRun:
    """Run lm-eval on `tasks` and turn its results into scores and repetition-scored samples.

    Args:
        lm: an lm-eval LM on the loaded model (`Backend.lm_eval_model(gen)`).
        tasks: lm-eval task or group names.
        gen: decoding settings.
        limit: samples per task (None = all).
        items: only this slice of each task's documents (after `limit`; each subtask of a group on
            its own); a task with no document in the slice is left out. None = all up to limit.
        loop: loop thresholds for the samples.
        chat_template: apply the tokenizer's chat template (when it has one).
        tokenizer: the model's tokenizer (turns generations back into ids; tells if it has a template).
        device: resolved torch device (recorded).
        include_path: extra task directory (the toy tasks).
        include_defaults: also index lm-eval's own ~thousands of tasks (slow; off for toy-only runs).
        unsafe_code: allow tasks that execute generated code (HumanEval).

    Returns:
        The run's scores, samples and resolved config.

    Raises:
        EvalError: unknown task names, a tag name, a dataset missing offline, a missing package.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    quiet_lm_eval()
    include = str(include_path) if include_path else None
    manager = TaskManager(include_path=include, include_defaults=include_defaults)
    for task in tasks:
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=5)
            hint = f"; did you mean: {', '.join(close)}" if close else ""
            raise EvalError(f"unknown lm-eval task {task!r}{hint}")
    use_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    config = {
        "model": type(lm).__name__,
        "device": device,
        "gen_kwargs": gen_kwargs(gen),
        "apply_chat_template": use_template,
    }
    with _data_errors(tasks):
        loaded = {task: _load_task(manager, task) for task in tasks}
        indices = None
        if items is not None:
            indices = _item_indices(loaded.values(), limit, items)
            pruned = {name: _prune(task, indices) for name, task in loaded.items()}
            loaded = {name: task for name, task in pruned.items() if task is not None}
        if not loaded:  # the slice holds no item of any task
            return LmEvalRun(scores=[], samples=[], config={**config, "versions": {}, "n-shot": {}})
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(loaded.values()),
            batch_size=gen.batch_size,
            device=device,
            limit=limit if indices is None else None,  # lm-eval takes one or the other
            samples=indices,
            log_samples=True,
            apply_chat_template=use_template,
            gen_kwargs=gen_kwargs(gen),
            task_manager=manager,
            bootstrap_iters=BOOTSTRAP_ITERS,
            random_seed=gen.seed,
            numpy_random_seed=gen.seed,
            torch_random_seed=gen.seed,
            fewshot_random_seed=gen.seed,
            confirm_run_unsafe_code=unsafe_code,
        )
    scores = [score for task in loaded for score in _scores(results, task)]
    samples = _samples(results, list(loaded), tokenizer, gen.max_new_tokens, loop)
    config |= {
        "versions": {k: str(v) for k, v in results.get("versions", {}).items()},
        "n-shot": results.get("n-shot", {}),
    }
    return LmEvalRun(scores=scores, samples=samples, config=config)


@contextlib.contextmanager
def _data_errors(tasks: Sequence[str]):
    """Turn lm-eval's failures to load a task's data (or its packages) into one-line EvalErrors."""
    try:
        yield
    except ConnectionError as err:  # datasets raises it for a dataset that is not in the local cache
        raise EvalError(
            f"lm-eval could not load the data of {', '.join(tasks)}: {err}; when offline, put the "
            "datasets in the local Hugging Face cache first"
        ) from err
    except ModuleNotFoundError as err:  # some tasks need extra packages (ifeval: langdetect, ...)
        raise EvalError(
            f"an lm-eval task of {', '.join(tasks)} needs the Python package {err.name!r}: "
            f"pip install {err.name}"
        ) from err


def _load_task(manager, name: str):
    """The loaded lm-eval Task or Group of that name (its datasets loaded, once for the whole run)."""
    loaded = manager.load(name)
    for kind in ("groups", "tasks"):
        if name in loaded[kind]:
            return loaded[kind][name]
    # A tag: a set of tasks with no score of its own.
    members = ", ".join(loaded["tasks"])
    raise EvalError(f"lm-eval name {name!r} is a tag, not a task or group; name its tasks: {members}")


def _leaf_tasks(task) -> list:
    """The leaf Tasks of a loaded Task or Group (itself for a Task)."""
    return task.get_all_tasks() if hasattr(task, "get_all_tasks") else [task]


def _item_indices(tasks, limit: int | None, items: ItemSlice) -> dict[str, list[int]]:
    """Each leaf task's document indices in the slice, for `simple_evaluate(samples=...)`.

    Indices are ascending: lm-eval maps a logged doc_id back through this list by position.
    Leaves with no document in the slice are absent (an empty list would make lm-eval run them all).
    """
    indices = {}
    for task in tasks:
        for leaf in _leaf_tasks(task):
            positions = item_positions(len(leaf.eval_docs), limit, items)
            if positions:
                indices[leaf.task_name] = list(positions)
    return indices


def _prune(task, indices: dict[str, list[int]]):
    """The task without its leaves that have no document in the slice; None when nothing is left."""
    if not hasattr(task, "get_all_tasks"):
        return task if task.task_name in indices else None
    for name in task.child_names:
        if _prune(task.get(name), indices) is None:
            task.pop(name)
    return task if len(task) else None


def _leaves(results: dict, name: str) -> list[str]:
    """The task names under a requested task or group (itself for a plain task)."""
    children = results.get("group_subtasks", {}).get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaves(results, child)]


def metric_name(metric: str, filter_name: str) -> str:
    """The name of an lm-eval metric under one filter, as BenchmarkScore and Sample.scores spell it.

    Args:
        metric: lm-eval's metric name (e.g. "exact_match").
        filter_name: the filter it was computed after ("none" when the task has no filter_list).

    Returns:
        The metric for filter "none", else "<metric>_<filter>" (e.g. "exact_match_strict-match").
    """
    return metric if filter_name == "none" else f"{metric}_{filter_name}"


def _scores(results: dict, task: str) -> list[BenchmarkScore]:
    metrics = results["results"][task]
    leaves = _leaves(results, task)
    n_samples = results.get("n-samples", {})
    n = sum(n_samples[leaf]["effective"] for leaf in leaves if leaf in n_samples)
    n_total = sum(n_samples[leaf]["original"] for leaf in leaves if leaf in n_samples)
    higher = results.get("higher_is_better", {}).get(task, {})
    version = str(results.get("versions", {}).get(task, ""))
    scores = []
    for key, value in metrics.items():
        if "," not in key or "_stderr," in key or not isinstance(value, int | float):
            continue  # "alias", stderr entries, non-numeric values
        metric, filter_name = key.split(",", 1)
        stderr = metrics.get(f"{metric}_stderr,{filter_name}")
        scores.append(
            BenchmarkScore(
                benchmark=task,
                metric=metric_name(metric, filter_name),
                value=float(value),
                stderr=float(stderr) if isinstance(stderr, int | float) else None,
                n=n,
                n_total=n_total,
                higher_is_better=bool(higher.get(metric, True)),
                version=version,
            )
        )
    return scores


def _samples(
    results: dict, tasks: Sequence[str], tokenizer, max_new_tokens: int, loop: LoopThresholds
) -> list[Sample]:
    """One Sample per logged document: lm-eval logs a document once per filter, with that filter's metrics."""
    out = []
    for task in tasks:
        for leaf in _leaves(results, task):
            by_doc: dict[int, list[dict]] = {}  # doc_id -> its logged entries, one per filter
            for logged in results.get("samples", {}).get(leaf, []):
                by_doc.setdefault(logged["doc_id"], []).append(logged)
            for entries in by_doc.values():
                out.append(_sample(task, leaf, entries, tokenizer, max_new_tokens, loop))
    return out


def _sample(
    benchmark: str, leaf: str, entries: list[dict], tokenizer, max_new_tokens: int, loop: LoopThresholds
) -> Sample:
    first = entries[0]  # the generation is the same under every filter
    response = first["resps"][0][0]
    # Log-likelihood tasks (multiple choice) log (logprob, is_greedy) pairs: there is no generation.
    generated = isinstance(response, str)
    text = response if generated else ""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if generated else []
    finish = ("length" if len(ids) >= max_new_tokens else "stop") if generated else None
    item = item_id(first["doc_id"], first["doc"], task=None if leaf == benchmark else leaf)
    sample = score_sample(benchmark, first["arguments"][0][0], text, ids, finish, loop, item_id=item)
    metric = next((m for m in ("exact_match", "acc") if m in first), None)
    sample.target = str(first["target"])
    sample.correct = bool(first[metric]) if metric else None
    sample.scores = {
        metric_name(name, entry["filter"]): value
        for entry in entries
        for name in entry["metrics"]
        if (value := _number(entry[name])) is not None
    }
    return sample


def _number(value) -> float | None:
    """A per-item metric value as a float; None for values that are not one number (lists, pairs)."""
    if isinstance(value, bool | int | float):
        return float(value)
    if getattr(value, "ndim", None) == 0:  # a numpy scalar (np.bool_, np.int64, ...)
        return float(value.item())
    return None
