"""A scripted OpenAI-compatible ``/v1/chat/completions`` server on 127.0.0.1 for tests and dry runs.

Answers with a deterministic "cleaned" report: the rule-based cleaner (report_cleaner ``rules``) applied to the
last user message (its first line is dropped when it is a ``Label:`` line such as ``Pathology report:``).
Per-report scripts make it fail on purpose: ``script={"needle": [429, 500, "sleep", "ok"]}`` makes the n-th
request whose last user message contains ``needle`` answer HTTP 429 / 500, sleep past the client's timeout, or
answer normally (later requests answer normally). It records every request body and the largest number of
requests it was serving at once.

Run by hand (for the documented pipeline, before pointing gigapath at a real LLM server)::

    python tests/llm_server.py --port 8765      # then base_url: http://127.0.0.1:8765/v1, model: echo
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def rules_answer(user_message: str) -> str:
    from gigapath_plugins.text.report_cleaning import RuleReportCleaner

    first, _, rest = user_message.partition("\n")
    text = rest if first.rstrip().endswith(":") and rest else user_message
    return RuleReportCleaner().clean(text) or "No diagnostic text."


class ScriptedChatServer:
    """Start with :meth:`start` (or as a context manager); ``base_url`` is ``http://127.0.0.1:<port>/v1``."""

    def __init__(self, script: dict[str, list] | None = None, delay_s: float = 0.0, sleep_s: float = 2.0,
                 answer: Callable[[str], str] = rules_answer, retry_after: str | None = None, port: int = 0):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.delay_s, self.sleep_s, self.answer, self.retry_after = delay_s, sleep_s, answer, retry_after
        self.requests: list[dict] = []  # every request body, in arrival order
        self.headers: list[dict] = []  # the headers of each request
        self.statuses: list[int] = []  # the status answered to each request (0 = slept past the timeout)
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> "ScriptedChatServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def requests_for(self, needle: str) -> int:
        return sum(needle in body["messages"][-1]["content"] for body in self.requests)

    def _action(self, user: str):
        with self.lock:
            for needle, actions in self.script.items():
                if needle in user and actions:
                    return actions.pop(0)
        return "ok"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    user = body["messages"][-1]["content"]
                    action = server._action(user)
                    time.sleep(server.delay_s)
                    if action == "sleep":
                        server.statuses.append(0)
                        time.sleep(server.sleep_s)
                        return
                    if isinstance(action, int):
                        server.statuses.append(action)
                        headers = {"Retry-After": server.retry_after} if server.retry_after and action == 429 else {}
                        return self._send(action, {"error": {"message": f"scripted {action}"}}, headers)
                    server.statuses.append(200)
                    self._send(200, {
                        "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion",
                        "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": server.answer(user)}}],
                    })
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

        return Handler


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    srv = ScriptedChatServer(port=args.port)
    print(f"serving an OpenAI-compatible echo cleaner at {srv.base_url} (model: any name); Ctrl-C to stop", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
