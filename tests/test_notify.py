"""The verdict webhook: a failed post is logged and never fatal; the payload says what a reader needs."""

from __future__ import annotations

import logging
import socket

import pytest
from pydantic import ValidationError

from tasks.notify import NotifySettings, post, verdict_payload

SUMMARY = {
    "config": "demo",
    "promoted": None,
    "champion": "c0",
    "candidates": [
        {"id": "c1", "label": "ties", "status": "failed", "decision": "rejected",
         "failure": "merge of ties: killed by SIGKILL"},
        {"id": "c2", "label": "scf_rkl", "status": "ok", "decision": "rejected", "failure": None},
    ],
}


def test_the_payload_names_the_outcome_the_failures_and_the_links() -> None:
    payload = verdict_payload(SUMMARY, {"mlflow": "http://mlflow/run", "prefect": None})
    assert payload["text"].splitlines() == [
        "scf-pipeline demo: nothing promoted; champion stays c0.",
        "2 candidates, 1 failed.",
        "failed: ties: merge of ties: killed by SIGKILL",
        "mlflow: http://mlflow/run",
    ]
    failure = {"label": "ties", "id": "c1", "failure": "merge of ties: killed by SIGKILL"}
    assert payload["failures"] == [failure]


def test_a_post_that_fails_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with caplog.at_level(logging.WARNING, logger="tasks.notify"):
        assert post(NotifySettings(webhook_url=f"http://127.0.0.1:{port}/x"), {"text": "t"}) is False
    assert "the verdict could not be posted" in caplog.text
    assert f"127.0.0.1:{port}" not in caplog.text  # a webhook URL is a credential: never logged


def test_the_settings_take_one_target() -> None:
    with pytest.raises(ValidationError, match="give webhook_url or block, not both"):
        NotifySettings(webhook_url="https://hooks.example/x", block="slack")
    with pytest.raises(ValidationError, match="must start with http"):
        NotifySettings(webhook_url="ftp://x")
