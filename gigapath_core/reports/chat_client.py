"""Minimal client of the OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint (standard library only).

vLLM (``vllm serve``), llama.cpp's ``llama-server``, Ollama (``/v1``), LM Studio and the hosted APIs all speak
it. Request body: ``{"model", "messages": [{"role", "content"}...], "temperature", "max_tokens"?}``; answer:
``choices[0].message.content`` (OpenAI API reference, "Create chat completion").

Retries: HTTP 429 and 5xx, connection errors and timeouts are retried up to ``max_retries`` times with
exponential backoff (``backoff_s * 2**attempt``, plus up to 10 % jitter, capped at ``max_backoff_s``); a
``Retry-After`` header (seconds or an HTTP date) is honoured, capped the same way. Other 4xx answers fail at
once (a wrong model name does not become right by asking again). Proxy settings from the environment are
ignored: requests go directly to ``base_url``.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..errors import GigapathError

#: no proxy from the environment (HTTP_PROXY...): reports go straight to base_url, never through a third party
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
#: removed from answers: the reasoning block some local models (Qwen3, DeepSeek-R1) put before the answer
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


class ChatError(GigapathError):
    """The chat endpoint did not give a usable answer (after retries). ``retryable`` tells whether it was
    a transient failure (429, 5xx, timeout, connection refused)."""

    def __init__(self, message: str, retryable: bool = False, attempts: int = 1):
        self.retryable, self.attempts = retryable, attempts
        super().__init__(message)


@dataclass
class ChatClient:
    """One OpenAI-compatible chat endpoint.

    Attributes:
        base_url: e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
        model: the served model's name (``--served-model-name`` in vLLM, the tag in Ollama).
        api_key: sent as ``Authorization: Bearer``; None sends no header (local servers need none).
        timeout_s: per-request timeout (connect + read), seconds.
        max_retries: retries after the first attempt for transient failures.
        backoff_s, max_backoff_s: first backoff and its cap, seconds.
        temperature, max_tokens: generation settings (max_tokens None = the server's default).
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    temperature: float = 0.0
    max_tokens: int | None = None

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def complete(self, messages: list[dict[str, str]]) -> str:
        """Messages -> the assistant's answer (stripped, without a leading ``<think>`` block).

        Raises ChatError after the last retry, or at once for a non-retryable answer (4xx other than 429,
        an answer that is not JSON or has no content, an answer cut by ``max_tokens``).
        """
        body = {"model": self.model, "messages": messages, "temperature": self.temperature, "stream": False}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: ChatError | None = None
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with _OPENER.open(req, timeout=self.timeout_s) as resp:
                    payload = resp.read()
                return _answer(payload)
            except urllib.error.HTTPError as err:
                detail = _snippet(err.read() if err.fp else b"")
                retryable = err.code == 429 or err.code >= 500
                last = ChatError(f"HTTP {err.code} from {self.url}: {detail}", retryable, attempt + 1)
                wait = _retry_after(err.headers.get("Retry-After") if err.headers else None)
            except (TimeoutError, socket.timeout):
                last = ChatError(f"timeout after {self.timeout_s:g} s waiting for {self.url}", True, attempt + 1)
            except urllib.error.URLError as err:
                reason = err.reason
                timed_out = isinstance(reason, (TimeoutError, socket.timeout))
                what = f"timeout after {self.timeout_s:g} s" if timed_out else f"cannot reach: {reason}"
                last = ChatError(f"{what} ({self.url})", True, attempt + 1)
            except (ConnectionError, http.client.HTTPException) as err:
                last = ChatError(f"connection error from {self.url}: {type(err).__name__}: {err}", True, attempt + 1)
            if not last.retryable or attempt == self.max_retries:
                break
            backoff = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            backoff += random.uniform(0, 0.1 * backoff)
            time.sleep(min(self.max_backoff_s, wait) if wait is not None else backoff)
        assert last is not None
        if last.retryable:
            last = ChatError(f"{last} (gave up after {last.attempts} attempts)", True, last.attempts)
        raise last


def _answer(payload: bytes) -> str:
    try:
        obj = json.loads(payload)
        choice = obj["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ChatError(f"not an OpenAI chat completion answer: {_snippet(payload)}") from None
    if choice.get("finish_reason") == "length":
        raise ChatError("answer cut at max_tokens (finish_reason 'length'); raise max_tokens")
    text = _THINK.sub("", content or "").strip()
    if not text:
        raise ChatError("empty answer")
    return text


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` (delta-seconds or an HTTP date, RFC 9110 §10.2.3) -> seconds to wait, or None."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _snippet(payload: bytes, n: int = 200) -> str:
    text = payload.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:n] + ("..." if len(text) > n else "") if text else "(empty body)"
