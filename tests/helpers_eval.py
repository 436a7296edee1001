"""lm-eval on a loaded backend with only the local tasks of one directory (toy tasks, test variants)."""

from __future__ import annotations

from pathlib import Path

from evals import toytasks
from evals.reasoning import LmEvalRun, run_lm_eval
from evals.spec import GenParams, ItemSlice, LoopThresholds

GEN = GenParams(max_new_tokens=toytasks.MAX_NEW_TOKENS, batch_size=8)


def run_local_tasks(
    backend,
    tasks: list[str],
    include_path: Path,
    *,
    limit: int | None = None,
    items: ItemSlice | None = None,
    chat_template: bool = True,
) -> LmEvalRun:
    """`run_lm_eval` on the backend's model (greedy, the toy token budget) over `include_path`'s tasks."""
    return run_lm_eval(
        backend.lm_eval_model(GEN),
        tasks,
        gen=GEN,
        limit=limit,
        items=items,
        loop=LoopThresholds(),
        chat_template=chat_template,
        tokenizer=backend.tokenizer,
        device="cpu",
        include_path=include_path,
        include_defaults=False,
    )
