"""LLM report cleaner (report_cleaner ``llm``) against a scripted OpenAI-compatible server on 127.0.0.1
(tests/llm_server.py): prompt layout, concurrency bound, retries, timeout, cache resume, failures."""

from __future__ import annotations

import time

import pytest
from llm_server import ScriptedChatServer, rules_answer

from gigapath_core.api import build
from gigapath_core.errors import ConfigError
from gigapath_core.plugins import get_plugin_manager
from gigapath_core.reports.prompt import DEFAULT_USER_TEMPLATE
from gigapath_plugins.text.llm_cleaner import LLMReportCleaner, ReportCleaningError, is_local_host

EXAMPLES = [
    {"raw": "Patient: John Roe. FINAL DIAGNOSIS: Benign colonic mucosa. Dr. Kay 01/02/2023.",
     "cleaned": "Benign colonic mucosa."},
    {"raw": "MRN 1234567. Lung, biopsy: adenocarcinoma, acinar. Signed by Ann Lee, MD.",
     "cleaned": "Lung, biopsy: adenocarcinoma, acinar."},
]
REPORTS = [
    f"Case {i}. Skin, shave biopsy: seborrheic keratosis number {i}. Reviewed with Dr. Smith on 03/14/2024."
    for i in range(6)
]


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The plugin is registered through an entry point once the plugins package is re-installed; before that,
    register it in-process so build() finds it."""
    pm = get_plugin_manager()
    if "llm" not in pm.plugins["report_cleaner"]:
        pm._add("report_cleaner", LLMReportCleaner, "gigapath-plugins")


@pytest.fixture
def server():
    srv = ScriptedChatServer().start()
    yield srv
    srv.stop()


def make(srv, tmp_path, **kw):
    params = dict(base_url=srv.base_url, model="echo-model", examples=EXAMPLES, cache_dir=str(tmp_path / "cache"),
                  backoff_s=0.01, max_backoff_s=0.05, timeout_s=5.0)
    return build("report_cleaner", "llm", **{**params, **kw})


def test_prompt_holds_instructions_exemplars_in_order_then_the_report(server, tmp_path):
    cleaner = make(server, tmp_path, instructions="Clean it.", temperature=0.0, max_tokens=300)
    out = cleaner.clean_all(REPORTS[:2])
    assert [o.text for o in out] == [rules_answer(DEFAULT_USER_TEMPLATE.format(report=r)) for r in REPORTS[:2]]
    assert "Smith" not in out[0].text and "seborrheic keratosis number 0" in out[0].text
    assert len(server.requests) == 2
    by_report = {b["messages"][-1]["content"]: b for b in server.requests}
    body = by_report[f"Pathology report:\n{REPORTS[1]}"]
    assert body["model"] == "echo-model" and body["temperature"] == 0.0 and body["max_tokens"] == 300
    assert body["messages"] == [
        {"role": "system", "content": "Clean it."},
        {"role": "user", "content": f"Pathology report:\n{EXAMPLES[0]['raw']}"},
        {"role": "assistant", "content": EXAMPLES[0]["cleaned"]},
        {"role": "user", "content": f"Pathology report:\n{EXAMPLES[1]['raw']}"},
        {"role": "assistant", "content": EXAMPLES[1]["cleaned"]},
        {"role": "user", "content": f"Pathology report:\n{REPORTS[1]}"},
    ]
    assert "Authorization" not in server.headers[0]  # no api_key_env: no key sent


def test_exemplars_file_is_read_in_order(server, tmp_path):
    f = tmp_path / "ex.yaml"
    f.write_text("exemplars:\n- {cluster: 1, raw: 'B raw', cleaned: 'B clean'}\n- {cluster: 0, raw: 'A raw', "
                 "cleaned: 'A clean'}\n")
    make(server, tmp_path, examples=[], exemplars=str(f)).clean(REPORTS[0])
    msgs = server.requests[0]["messages"]
    assert [m["content"] for m in msgs[1:5]] == ["Pathology report:\nB raw", "B clean", "Pathology report:\nA raw",
                                                 "A clean"]
    f.write_text("exemplars:\n- {raw: 'B raw', cleaned: ''}\n")
    with pytest.raises(ConfigError, match=r"exemplars.*exemplar\(s\) 1 have an empty 'cleaned:'"):
        make(server, tmp_path, examples=[], exemplars=str(f))


def test_concurrency_is_bounded(tmp_path):
    with ScriptedChatServer(delay_s=0.15) as srv:
        out = make(srv, tmp_path, max_concurrency=3).clean_all(REPORTS * 2)  # 6 distinct reports, each asked once
        assert len(srv.requests) == 6
        assert srv.max_in_flight == 3
        assert [o.status for o in out] == ["ok"] * 12


def test_retries_on_429_and_500_then_succeeds(tmp_path):
    with ScriptedChatServer(script={"number 1.": [429], "number 2.": [500, 503]}) as srv:
        cleaner = make(srv, tmp_path)
        out = cleaner.clean_all(REPORTS[:3])
        assert [o.status for o in out] == ["ok", "ok", "ok"]
        assert [srv.requests_for(f"number {i}.") for i in range(3)] == [1, 2, 3]
        assert sorted(srv.statuses) == [200, 200, 200, 429, 500, 503]
        assert cleaner.stats == {"requests": 3, "cache_hits": 0, "failed": 0}


def test_retry_after_is_honoured(tmp_path):
    with ScriptedChatServer(script={"number 0.": [429]}, retry_after="1") as srv:
        t0 = time.monotonic()
        assert make(srv, tmp_path, max_backoff_s=5.0).clean_all(REPORTS[:1])[0].status == "ok"
        assert time.monotonic() - t0 >= 0.95  # waited the server's 1 s, not the 0.01 s backoff
        assert srv.requests_for("number 0.") == 2


def test_timeout_is_retried_then_recorded_as_failure_and_the_report_kept(tmp_path):
    script = {"number 0.": ["sleep"], "number 1.": ["sleep", "sleep"]}
    with ScriptedChatServer(script=script, sleep_s=1.5) as srv:
        out = make(srv, tmp_path, timeout_s=0.4, max_retries=1).clean_all(REPORTS[:3])
        assert out[0].status == "ok" and srv.requests_for("number 0.") == 2  # timed out once, then answered
        assert out[1].status == "failed" and out[1].text == REPORTS[1]  # left uncleaned, not dropped
        assert "timeout after 0.4 s" in out[1].reason and "gave up after 2 attempts" in out[1].reason
        assert out[2].status == "ok"


def test_client_error_is_not_retried_and_stop_aborts(tmp_path):
    with ScriptedChatServer(script={"number 3.": [400]}) as srv:
        out = make(srv, tmp_path, max_concurrency=1).clean_all(REPORTS[:4])
        assert out[3].status == "failed" and out[3].reason.startswith("HTTP 400") and srv.requests_for("number 3.") == 1
    with ScriptedChatServer(script={"number 3.": [400]}) as srv:
        with pytest.raises(ReportCleaningError, match="HTTP 400.*on_error is 'stop'"):
            make(srv, tmp_path / "b", max_concurrency=1, on_error="stop").clean_all(REPORTS[3:5])


def test_cache_resumes_an_interrupted_run_and_a_rerun_sends_nothing(tmp_path):
    with ScriptedChatServer(script={"number 4.": [500, 500]}) as srv:
        first = make(srv, tmp_path, max_retries=1).clean_all(REPORTS)
        assert [o.status for o in first].count("failed") == 1 and first[4].status == "failed"
        assert len(srv.requests) == 7  # 5 answered + report 4 twice
        again = make(srv, tmp_path, max_retries=1)
        second = again.clean_all(REPORTS)
        assert len(srv.requests) == 8 and srv.requests_for("number 4.") == 3  # only the failed one was asked
        assert [o.status for o in second] == ["ok"] * 6 and [o.cached for o in second].count(True) == 5
        assert [o.text for o in second[:4]] == [o.text for o in first[:4]]
        third = make(srv, tmp_path).clean_all(REPORTS)
        assert len(srv.requests) == 8 and all(o.cached for o in third)  # a re-run costs nothing
        make(srv, tmp_path, model="other-model").clean_all(REPORTS[:1])  # another model: another key
        make(srv, tmp_path, examples=EXAMPLES[:1]).clean_all(REPORTS[:1])  # another prompt: another key
        assert len(srv.requests) == 10


def test_api_key_comes_from_the_environment_only(server, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"report_cleaner\.params\.api_key: .*api_key_env"):
        make(server, tmp_path, api_key="sk-secret")
    monkeypatch.delenv("GIGAPATH_TEST_LLM_KEY", raising=False)
    with pytest.raises(ConfigError, match="GIGAPATH_TEST_LLM_KEY is not set"):
        make(server, tmp_path, api_key_env="GIGAPATH_TEST_LLM_KEY")
    monkeypatch.setenv("GIGAPATH_TEST_LLM_KEY", "sk-local")
    make(server, tmp_path, api_key_env="GIGAPATH_TEST_LLM_KEY").clean("Benign skin.")
    assert server.headers[0]["Authorization"] == "Bearer sk-local"


def test_reports_stay_on_the_local_network_unless_allowed(tmp_path):
    for host in ("127.0.0.1", "localhost", "10.2.3.4", "192.168.1.20", "[::1]", "llm-box", "gpu.hospital.internal"):
        assert is_local_host(host.strip("[]")), host
    for host in ("8.8.8.8", "2001:4860:4860::8888"):
        assert not is_local_host(host), host
    with pytest.raises(ConfigError, match=r"base_url: 8\.8\.8\.8 is not a loopback.*allow_remote: true"):
        build("report_cleaner", "llm", base_url="http://8.8.8.8/v1", model="m", cache_dir=None)
    with pytest.raises(ConfigError, match=r"base_url"):
        build("report_cleaner", "llm", base_url="ftp://x", model="m")


def test_environment_proxies_are_not_used(server, tmp_path, monkeypatch):
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(var, "http://10.255.255.1:3128")  # a proxy would see every report
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    out = make(server, tmp_path, timeout_s=2.0, max_retries=0).clean_all(REPORTS[:1])
    assert out[0].status == "ok" and len(server.requests) == 1


def test_answers_are_parsed_strictly(tmp_path):
    import email.utils
    import json

    from gigapath_core.reports.chat_client import ChatError, _answer, _retry_after

    def payload(content, finish="stop"):
        return json.dumps({"choices": [{"message": {"content": content}, "finish_reason": finish}]}).encode()

    assert _answer(payload("<think>the margins...</think>\n Benign skin. ")) == "Benign skin."
    for bad, msg in ((payload("Benign", "length"), "cut at max_tokens"), (payload("  "), "empty answer"),
                     (b"<html>502</html>", "not an OpenAI chat completion answer")):
        with pytest.raises(ChatError, match=msg):
            _answer(bad)
    assert _retry_after("3") == 3.0 and _retry_after(None) is None and _retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < _retry_after(later) <= 30
    with ScriptedChatServer(answer=lambda user: "<think>x</think>Cleaned.") as srv:
        assert make(srv, tmp_path).clean("Benign skin. MRN 1234567.") == "Cleaned."
