"""The pipeline layer's errors: bad input (`PipelineError`) and a step that failed (`StepFailed`)."""

from __future__ import annotations

from pathlib import Path


class PipelineError(ValueError):
    """Bad pipeline input. The message names the config key and the allowed values."""


class StepFailed(RuntimeError):
    """A merge, evaluation or zoo build that did not finish: its child process exited non-zero, was
    killed, or ran past its timeout.

    The message is one line, ``<step> of <label>: <reason>``. Prefect carries it in the failed task's
    (or flow run's) state, so a candidate's failure can be recorded without failing the night.

    Attributes:
        step: ``merge``, ``evaluate`` or ``zoo``.
        label: the model the step was for.
        reason: what happened (the child's ``error:`` line, the signal, the timeout).
        tail: the child's last output lines.
        log_path: the child's full log.
    """

    def __init__(
        self, step: str, label: str, reason: str, tail: list[str] | None = None, log_path: Path | None = None
    ) -> None:
        super().__init__(f"{step} of {label}: {reason}")
        self.step, self.label, self.reason = step, label, reason
        self.tail = tail or []
        self.log_path = log_path

    def __reduce__(self):  # picklable with its fields (Prefect persists exceptions in states)
        return (StepFailed, (self.step, self.label, self.reason, self.tail, self.log_path))


class NightFailed(RuntimeError):
    """A run that could not reach a verdict: a parent could not be evaluated, or no candidate could
    be judged. ``scf nightly`` exits non-zero on it (a night with some failed candidates does not).

    Attributes:
        notified: the night's verdict was already posted (``notify:``) before this was raised.
    """

    def __init__(self, message: str, *, notified: bool = False) -> None:
        super().__init__(message)
        self.notified = notified
