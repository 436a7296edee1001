"""A local stand-in for the Hugging Face hub (only what `huggingface_hub.snapshot_download` asks), on
loopback, with scripted faults: drop the first requests, then stall some, then serve.

Endpoints (huggingface_hub 2.4):

- ``GET /api/models/{repo}/revision/{rev}``: repo info, whose ``sha`` pins the commit;
- ``GET /api/models/{repo}/tree/{sha}?recursive=...``: the file listing;
- ``HEAD`` and ``GET /{repo}/resolve/{sha}/{file}``: a file's metadata (``X-Repo-Commit``, ``ETag``,
  ``Content-Length``) and its bytes.

``fail_with`` answers every request with that status (404 and 401 carry the hub's
``X-Error-Code: RepoNotFound``, as the real hub does), so a test can count that no retry storm
followed.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    """Serves one repo ``repo_id`` at commit ``sha`` holding the files of ``model_dir``.

    Attributes:
        requests: every request for the repo, as ``"METHOD path"``, in order (huggingface_hub's
            other calls, such as its agent registry, get a 404 and are not counted).
    """

    def __init__(
        self,
        repo_id: str,
        sha: str,
        model_dir: Path,
        *,
        drop: int = 0,
        stall: int = 0,
        stall_s: float = 3.0,
        fail_with: int | None = None,
    ) -> None:
        self.repo_id, self.sha = repo_id, sha
        self.files = {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}
        self.drop, self.stall, self.stall_s, self.fail_with = drop, stall, stall_s, fail_with
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The endpoint to put in ``HF_ENDPOINT``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault(self, line: str) -> str | None:
        """Record a request for the repo; return ``"drop"`` or ``"stall"`` while those faults last."""
        with self._lock:
            self.requests.append(line)
            n = len(self.requests)
        if n <= self.drop:
            return "drop"
        if n <= self.drop + self.stall:
            return "stall"
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                if (
                    hub.repo_id not in self.path
                ):  # huggingface_hub's side calls (agent registry): not the repo
                    return self._send(404, b"{}", {})
                fault = hub._fault(f"{self.command} {self.path}")
                if fault == "drop":  # the connection dies without a response
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "stall":  # accepted, never answered within the client's timeout
                    time.sleep(hub.stall_s)
                    self.close_connection = True
                    self.connection.close()
                    return
                if hub.fail_with is not None:
                    code = "RepoNotFound" if hub.fail_with in (401, 404) else None
                    return self._send(
                        hub.fail_with, b'{"error": "no"}', {"X-Error-Code": code} if code else {}
                    )
                path = unquote(urlparse(self.path).path)
                info = f"/api/models/{hub.repo_id}/revision/"
                tree = f"/api/models/{hub.repo_id}/tree/"
                resolve = f"/{hub.repo_id}/resolve/"
                if path.startswith(info):
                    siblings = [{"rfilename": name} for name in hub.files]
                    return self._json({"id": hub.repo_id, "sha": hub.sha, "siblings": siblings})
                if path.startswith(tree):
                    return self._json(
                        [
                            {
                                "type": "file",
                                "path": name,
                                "size": len(data),
                                "oid": hashlib.sha1(data).hexdigest(),
                            }
                            for name, data in hub.files.items()
                        ]
                    )
                if path.startswith(resolve):
                    name = path[len(resolve) :].split("/", 1)[1]
                    if name not in hub.files:
                        return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})
                    data = hub.files[name]
                    headers = {"X-Repo-Commit": hub.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                    return self._send(200, data, headers, body)
                return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})

            def _json(self, value: object) -> None:
                self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

            def _send(self, status: int, data: bytes, headers: dict, body: bool = True) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body and self.command != "HEAD":
                    self.wfile.write(data)

        return Handler
