"""Pool mode: one model of a night as a run of the ``merge-and-evaluate`` deployment on a work pool.

`run_on_pool` submits the run as a subflow of the calling flow (so the Prefect UI shows the night as a
tree), and watches it until it ends. Whichever worker of the pool is free runs it, on its own machine
and GPU. The run merges and evaluates and persists what it made in the shared result storage; it
writes neither DuckDB nor the gate (only the orchestrating ``nightly`` does).

How a run can end, and what the night does with it:

- Completed: its results are read from the result storage by their cache keys.
- Failed: the model's merge or evaluation failed (the state message says how); recorded ``failed``,
  not retried, since the same step would fail the same way.
- Crashed or Cancelled, or lost: the process or its machine died. A run that a worker took (Pending)
  or runs (Running) but that sent no heartbeat for ``heartbeat_timeout_s`` is marked Crashed here
  (its worker is gone and nobody else would ever end it). These are submitted again, ``retries``
  times, then recorded ``failed``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from pydantic import BaseModel

POLL_S = 2.0
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"


class PoolRun(BaseModel):
    """How a model's pool run(s) ended.

    Attributes:
        ok: the last run completed.
        message: why not (the failed run's state message, or the crashes).
        flow_run_ids: every run submitted for it, first to last.
    """

    ok: bool
    message: str = ""
    flow_run_ids: list[str] = []


@task(name="run-on-pool", task_run_name="pool-{label}")
def run_on_pool(
    deployment: str,
    parameters: dict[str, Any],
    label: str,
    work_queue: str | None,
    retries: int,
    heartbeat_timeout_s: float,
) -> PoolRun:
    """Run one model on the pool and wait for it; resubmit it after a crash.

    Args:
        deployment: ``<flow name>/<deployment name>``.
        parameters: the flow run's parameters.
        label: the model, for the run's name and messages.
        work_queue: a queue of the pool (None: the deployment's).
        retries: resubmissions after a crash or a lost worker.
        heartbeat_timeout_s: a running run silent for this long is taken as lost.

    Returns:
        How it ended.
    """
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    logger.info("%s: submitting to the pool", label)
    runs: list[str] = []
    message = ""
    for attempt in range(1 + retries):
        flow_run = run_deployment(deployment, parameters=parameters, work_queue_name=work_queue, timeout=0)
        runs.append(str(flow_run.id))
        logger.info("%s: submitted flow run %s (attempt %d)", label, flow_run.id, attempt + 1)
        state = watch(flow_run.id, heartbeat_timeout_s)
        if state.is_completed():
            return PoolRun(ok=True, flow_run_ids=runs)
        message = state.message or state.name or "no message"
        if state.is_failed():
            return PoolRun(ok=False, message=message, flow_run_ids=runs)
        logger.warning("%s: flow run %s ended %s (%s)", label, flow_run.id, state.name, message)
    attempts = f"{len(runs)} time{'s' if len(runs) > 1 else ''}"
    return PoolRun(ok=False, message=f"pool run crashed {attempts}; last: {message}", flow_run_ids=runs)


def watch(flow_run_id: UUID, heartbeat_timeout_s: float) -> Any:
    """Poll a flow run until it ends; mark it Crashed when it runs without heartbeats.

    Args:
        flow_run_id: the run.
        heartbeat_timeout_s: how long a Running run may stay silent.

    Returns:
        Its final state.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            state = flow_run.state
            if state is not None and state.is_final():
                return state
            # Pending: a worker took the run and is starting it; Running: it runs. Either way its
            # process should be alive (Scheduled runs wait for a free worker and are left alone).
            if state is not None and (state.is_running() or state.is_pending()):
                silent = _seconds_since(_last_sign_of_life(client, flow_run))
                if silent > heartbeat_timeout_s:
                    lost = Crashed(message=f"no heartbeat for {silent:.0f} s: its worker was lost")
                    client.set_flow_run_state(flow_run_id, lost, force=True)
                    return lost
            time.sleep(POLL_S)


def _last_sign_of_life(client: Any, flow_run: Any) -> datetime:
    """The later of the run's last heartbeat event and the moment it entered its current state."""
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventOrder,
        EventResourceFilter,
    )

    started = flow_run.state.timestamp
    events = client.read_events(
        EventFilter(
            occurred=EventOccurredFilter(since=started - timedelta(seconds=1)),
            event=EventNameFilter(name=[HEARTBEAT_EVENT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run.id}"]),
            order=EventOrder.DESC,
        ),
        limit=1,
    ).events
    return max([started, *(event.occurred for event in events)])


def _seconds_since(moment: datetime) -> float:
    return (datetime.now(UTC) - moment.astimezone(UTC)).total_seconds()
