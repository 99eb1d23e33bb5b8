"""LLM report cleaner (report_cleaner ``llm``): the paper's cleaning step on any OpenAI-compatible chat server.

Xu et al. 2024 (Methods, "Vision–language alignment") cleaned 17,383 reports with an LLM given 4 hand-cleaned
reports (the ones nearest the k-means centres, see ``gigapath reports exemplars``) as in-context examples,
keeping what matters for the diagnosis and dropping hospital, physician and patient details. Hospitals run this
on a local server (vLLM, llama.cpp ``llama-server``, Ollama), because reports cannot leave the site:

- nothing is sent unless ``base_url`` is set, and a host outside the local network (one that does not resolve
  to a loopback or private address) is refused unless ``allow_remote: true``;
- the API key comes from the environment variable named by ``api_key_env``; a key in the config is refused;
- ``max_concurrency`` requests at once, retries with backoff on 429/5xx/timeouts (``Retry-After`` honoured),
  ``timeout_s`` per request (:mod:`gigapath_core.reports.chat_client`);
- answers are cached by (sha256(report), sha256(prompt), model) (:mod:`gigapath_core.reports.cache`): an
  interrupted run resumes, a re-run sends nothing;
- a report the server fails on is returned unchanged with ``status="failed"`` and the reason
  (``on_error: keep``) or stops the run (``on_error: stop``); it is never dropped.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator

from gigapath_core import hookimpl
from gigapath_core.errors import ConfigError, GigapathError
from gigapath_core.kinds import Cleaned, PluginParams, ReportCleaner
from gigapath_core.reports.cache import CleanCache
from gigapath_core.reports.chat_client import ChatClient, ChatError
from gigapath_core.reports.prompt import (
    DEFAULT_INSTRUCTIONS,
    DEFAULT_USER_TEMPLATE,
    Exemplar,
    Prompt,
    load_exemplars,
    sha256,
)

log = logging.getLogger("gigapath")
KEY = "report_cleaner.params"
_LOCAL_SUFFIXES = (".local", ".lan", ".internal", ".intranet", ".home.arpa", ".localdomain")


class ReportCleaningError(GigapathError):
    """A report could not be cleaned and ``on_error`` is ``stop``."""


class ExamplePair(PluginParams):
    raw: str = Field(..., min_length=1)
    cleaned: str = Field(..., min_length=1)


class LLMReportCleaner(ReportCleaner):
    """LLM cleaning on an OpenAI-compatible chat server with hand-cleaned in-context examples (the paper's)."""

    name = "llm"

    class Params(PluginParams):
        base_url: str = Field(..., description="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
        model: str = Field(..., min_length=1, description="model name as the server knows it")
        api_key_env: str | None = Field(None, description="environment variable holding the API key (none: no key)")
        api_key: str | None = Field(None, description="refused: put the key in the variable named by api_key_env")
        exemplars: str | None = Field(None, description="hand-cleaned exemplars file (gigapath reports exemplars)")
        examples: list[ExamplePair] = Field(default_factory=list, description="inline (raw, cleaned) pairs")
        instructions: str = Field(DEFAULT_INSTRUCTIONS, min_length=1, description="system message")
        user_template: str = Field(DEFAULT_USER_TEMPLATE, description="user message; '{report}' is replaced")
        max_concurrency: int = Field(4, ge=1, le=256, description="requests in flight at once")
        timeout_s: float = Field(120.0, gt=0, description="per-request timeout, seconds")
        max_retries: int = Field(5, ge=0, le=20, description="retries of a 429/5xx/timeout")
        backoff_s: float = Field(1.0, ge=0, description="first retry wait (doubles each retry)")
        max_backoff_s: float = Field(60.0, ge=0, description="longest wait between retries")
        temperature: float = Field(0.0, ge=0, le=2)
        max_tokens: int | None = Field(None, ge=1, description="answer length cap (None: the server's)")
        cache_dir: str | None = Field(
            "~/.cache/gigapath/report_cleaning", description="answer cache folder (null: no cache)"
        )
        on_error: Literal["keep", "stop"] = Field(
            "keep", description="keep: record the failure, leave the report uncleaned; stop: abort the run"
        )
        allow_remote: bool = Field(False, description="allow a base_url outside the local network")

        @field_validator("api_key")
        @classmethod
        def _no_key(cls, v):
            if v:
                raise ValueError(
                    "API keys are not read from config files; export it in an environment variable and set "
                    "api_key_env to that variable's name"
                )
            return v

        @field_validator("base_url")
        @classmethod
        def _url(cls, v):
            u = urlparse(v)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:8000/v1, got {v!r}")
            return v

    def __init__(self, base_url, model, api_key_env=None, api_key=None, exemplars=None, examples=(),
                 instructions=DEFAULT_INSTRUCTIONS, user_template=DEFAULT_USER_TEMPLATE, max_concurrency=4,
                 timeout_s=120.0, max_retries=5, backoff_s=1.0, max_backoff_s=60.0, temperature=0.0,
                 max_tokens=None, cache_dir="~/.cache/gigapath/report_cleaning", on_error="keep",
                 allow_remote=False):
        if not allow_remote and not is_local_host(urlparse(base_url).hostname):
            raise ConfigError(
                f"{KEY}.base_url",
                f"{urlparse(base_url).hostname} is not a loopback or private-network address: reports would "
                "leave the local network. Use a local server, or set allow_remote: true if this endpoint is "
                "approved to receive them",
            )
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(f"{KEY}.api_key_env", f"environment variable {api_key_env} is not set")
        pairs = load_exemplars(exemplars, f"{KEY}.exemplars") if exemplars else []
        pairs += [Exemplar(e["raw"] if isinstance(e, dict) else e.raw, e["cleaned"] if isinstance(e, dict)
                           else e.cleaned) for e in examples]
        if not pairs:
            log.warning("llm report cleaner: no in-context examples (set exemplars: or examples:)")
        try:
            self.prompt = Prompt(instructions, tuple(pairs), user_template)
        except ConfigError as err:
            raise ConfigError(f"{KEY}.user_template", str(err).split(": ", 1)[1]) from None
        self.client = ChatClient(base_url, model, key, timeout_s, max_retries, backoff_s, max_backoff_s,
                                 temperature, max_tokens)
        self.prompt_sha256 = self.prompt.fingerprint(temperature=temperature, max_tokens=max_tokens)
        self.cache = CleanCache(cache_dir, model, self.prompt_sha256) if cache_dir else None
        self.max_concurrency, self.on_error = max_concurrency, on_error
        self.stats = {"requests": 0, "cache_hits": 0, "failed": 0}
        self._lock = threading.Lock()

    def clean(self, report: str) -> str:
        """One report -> cleaned text (the raw report if the server failed and ``on_error`` is ``keep``)."""
        return self.clean_all([report])[0].text

    def clean_all(self, reports: list[str]) -> list[Cleaned]:
        """Clean many reports with up to ``max_concurrency`` requests in flight; identical reports are asked once.

        Returns one Cleaned per report, in order. Raises ReportCleaningError on the first failure when
        ``on_error`` is ``stop`` (answers received so far stay cached).
        """
        from gigapath_core.progress import make_progress

        results: dict[str, Cleaned] = {}
        todo: dict[str, str] = {}
        for r in reports:
            text = str(r or "").strip()
            h = sha256(text)
            if h in results or h in todo:
                continue
            hit = self.cache.get(h) if (self.cache and text) else None
            if not text:
                results[h] = Cleaned("")
            elif hit is not None:
                results[h] = Cleaned(hit, cached=True)
                self.stats["cache_hits"] += 1
            else:
                todo[h] = text
        stop = threading.Event()
        if todo:
            log.info("llm report cleaner: %d report(s) to send to %s (%d answered from the cache)", len(todo),
                     self.client.url, sum(r.cached for r in results.values()))
            with make_progress() as progress, ThreadPoolExecutor(min(self.max_concurrency, len(todo))) as pool:
                task = progress.add_task("reports", total=len(todo))
                futures = {pool.submit(self._one, h, text, stop): h for h, text in todo.items()}
                for fut in as_completed(futures):
                    if fut.cancelled():
                        continue
                    h = futures[fut]
                    results[h] = fut.result()
                    progress.advance(task)
                    if results[h].status == "failed" and self.on_error == "stop" and not stop.is_set():
                        stop.set()
                        for f in futures:
                            f.cancel()
                        first = results[h]
            if stop.is_set():
                raise ReportCleaningError(
                    f"a report could not be cleaned ({first.reason}); on_error is 'stop'. Answers received so far "
                    "are cached: re-run to resume"
                )
        return [results[sha256(str(r or "").strip())] for r in reports]

    def describe_endpoint(self) -> str:
        return f"{self.client.model} at {self.client.url}"

    def _one(self, h: str, text: str, stop: threading.Event) -> Cleaned:
        if stop.is_set():
            return Cleaned(text, "failed", "not sent: the run stopped on an earlier failure")
        with self._lock:
            self.stats["requests"] += 1
        try:
            out = self.client.complete(self.prompt.messages(text))
        except ChatError as err:
            with self._lock:
                self.stats["failed"] += 1
            log.warning("llm report cleaner: report %s... left uncleaned: %s", h[:12], err)
            return Cleaned(text, "failed", str(err))
        if self.cache:
            self.cache.put(h, out)
        return Cleaned(out)


def is_local_host(host: str | None) -> bool:
    """True for loopback/private/link-local IPs, ``localhost``, single-label and ``.local``-style intranet names,
    and names that resolve only to such addresses."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost") or "." not in host and ":" not in host:
        return True
    if host.endswith(_LOCAL_SUFFIXES):
        return True
    try:
        return _private(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(_private(ipaddress.ip_address(a.split("%")[0])) for a in addrs)


def _private(ip) -> bool:
    return ip.is_loopback or ip.is_private or ip.is_link_local


@hookimpl
def gigapath_report_cleaners():
    return [LLMReportCleaner]
