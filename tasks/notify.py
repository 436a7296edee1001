"""Tell someone: post the night's verdict to a webhook when a run ends.

The ``notify:`` config section names a URL (``webhook_url``, e.g. a Slack incoming webhook) or a saved
Prefect ``Webhook`` block (``block``). The payload is JSON with a Slack-compatible ``text`` field (one
readable paragraph) and the same facts as fields: promoted or not, the champion, the failures, and
links to the MLflow run and the Prefect flow run. A post that fails is logged and never fails the run.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

log = logging.getLogger(__name__)
TIMEOUT_S = 10.0


class NotifySettings(BaseModel):
    """The ``notify:`` section.

    Attributes:
        webhook_url: POST the verdict here (``http(s)://``). Treated as a secret: never logged.
        block: or the name of a saved Prefect ``Webhook`` block (``prefect.blocks.webhook.Webhook``)
            whose URL and headers are kept on the server.
    """

    model_config = ConfigDict(extra="forbid")
    webhook_url: str | None = None
    block: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> NotifySettings:
        if self.webhook_url and self.block:
            raise ValueError("notify: give webhook_url or block, not both")
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError("notify.webhook_url: must start with http:// or https://")
        return self


def verdict_payload(summary: dict[str, Any], links: dict[str, str | None]) -> dict[str, Any]:
    """The JSON posted for a night.

    Args:
        summary: the flow's summary (``flows.merge_eval.finish``).
        links: ``mlflow`` and ``prefect``: URLs (or commands) of the night's MLflow and Prefect runs.

    Returns:
        ``{text, config, promoted, champion, candidates, failures, links}``.
    """
    labels = {c["id"]: c["label"] for c in summary["candidates"]}
    failures = [{"label": c["label"], "id": c["id"], "failure": c["failure"]}
                for c in summary["candidates"] if c["status"] == "failed"]
    promoted = summary["promoted"]
    head = (f"promoted {labels[promoted]} ({promoted})" if promoted
            else f"nothing promoted; champion stays {summary['champion'] or 'none'}")
    text = [f"scf-pipeline {summary['config']}: {head}.",
            f"{len(summary['candidates'])} candidates, {len(failures)} failed."]
    text += [f"failed: {f['label']}: {f['failure']}" for f in failures]
    text += [f"{name}: {url}" for name, url in links.items() if url]
    return {
        "text": "\n".join(text),
        "config": summary["config"],
        "promoted": promoted,
        "promoted_label": labels.get(promoted) if promoted else None,
        "champion": summary["champion"],
        "candidates": [{"label": c["label"], "id": c["id"], "decision": c["decision"]}
                       for c in summary["candidates"]],
        "failures": failures,
        "links": links,
    }


def post(settings: NotifySettings, payload: dict[str, Any]) -> bool:
    """Post the payload; log and swallow any failure.

    Returns:
        Whether the post was accepted (a 2xx answer).
    """
    try:
        if settings.block:
            from prefect.blocks.webhook import Webhook

            response = Webhook.load(settings.block).call(payload)
            ok = 200 <= response.status_code < 300
        elif settings.webhook_url:
            request = urllib.request.Request(
                settings.webhook_url,
                data=json.dumps(payload).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                ok = 200 <= response.status < 300
        else:
            return False
    except Exception as err:  # never fatal: the verdict is already stored
        log.warning("notify: the verdict could not be posted (%s: %s)", type(err).__name__, err)
        return False
    if not ok:
        log.warning("notify: the webhook did not accept the verdict")
    return ok
