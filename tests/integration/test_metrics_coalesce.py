"""GET /metrics of a real daemon (parsed with prometheus_client's parser), `vallexctl status`, and
one model run for concurrent identical requests, over real sockets."""

from __future__ import annotations

import random
import string
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from click.testing import CliRunner
from daemon_harness import DaemonProcess, RpcClient
from prometheus_client.parser import text_string_to_metric_families

from vallexctl.cli import cli
from vallexd import protocol

TOKEN = "metrics-token"


@pytest.fixture(scope="module")
def daemon(daemon_factory: Any) -> DaemonProcess:
    return daemon_factory("metrics", ["--http-port", "0", "--http-token", TOKEN, "--threads", "1"])


def scrape(daemon: DaemonProcess, token: str | None = TOKEN) -> dict[str, list[Any]]:
    """{family name: samples} of one scrape."""
    assert daemon.http_url is not None
    req = urllib.request.Request(daemon.http_url + "/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families: dict[str, list[Any]], sample_name: str, **labels: str) -> float:
    """Sum of the samples named `sample_name` whose labels include `labels`."""
    return sum(s.value for samples in families.values() for s in samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_needs_the_token_like_every_route(daemon: DaemonProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(daemon, token=None)
    assert err.value.code == 401


def test_counters_count_requests(daemon: DaemonProcess) -> None:
    before = scrape(daemon)
    n = 3
    with daemon.client() as c:
        for i in range(n):
            c.call("synthesize", {"text": f"Counting request number {i}.", "language": "en"})
        c.call("synthesize", {"text": "Counting request number 0.", "language": "en"})  # a hit
    after = scrape(daemon)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vallexd_requests_total", transport="rpc", method="synthesize", outcome="ok") == n + 1
    assert delta("vallexd_cache_misses_total") == n and delta("vallexd_cache_hits_total") == 1
    assert delta("vallexd_engine_runs_total") == n
    assert delta("vallexd_synthesis_seconds_count", cache="miss") == n
    assert delta("vallexd_synthesis_seconds_count", cache="hit") == 1
    assert delta("vallexd_time_to_first_audio_seconds_count") == n + 1
    assert delta("vallexd_real_time_factor_count") == n
    assert delta("vallexd_ar_steps_total") > 0 and delta("vallexd_batch_size_count") > 0
    assert value(after, "vallexd_model_load_seconds") > 0
    assert value(after, "vallexd_presets") == 0 and value(after, "vallexd_queue_depth") == 0
    # The scrapes themselves are requests too.
    assert delta("vallexd_requests_total", transport="http", method="GET /metrics", outcome="ok") == 1


def test_label_set_stays_bounded(daemon: DaemonProcess) -> None:
    rng = random.Random(7)
    names = ["".join(rng.choices(string.ascii_letters, k=12)) for _ in range(1000)]
    with daemon.client() as c:
        for i, name in enumerate(names):
            c.send(protocol.request(i, "synthesize", {"text": "Hi.", "voice": name}))
        for _ in names:
            frame = c.recv()
            assert frame is not None and frame["ok"] is False and frame["error"]["code"] == "NOT_FOUND"
        _, response = c.request("method-" + names[1])
        assert response["error"]["code"] == "UNKNOWN_METHOD"
    families = scrape(daemon)
    text_labels = {str(s.labels) for samples in families.values() for s in samples}
    assert not any(name in label for name in names for label in text_labels)
    requests = families["vallexd_requests"]
    assert value(families, "vallexd_requests_total", transport="rpc", method="synthesize",
                 outcome="NOT_FOUND") == 1000
    assert value(families, "vallexd_requests_total", transport="rpc", method="other",
                 outcome="UNKNOWN_METHOD") == 1
    assert len(requests) < 40  # transports x known methods x outcomes seen, not x voice names


def test_vallexctl_status_shows_the_main_figures(daemon: DaemonProcess) -> None:
    result = CliRunner().invoke(cli, ["--socket", str(daemon.socket_path), "status"])
    assert result.exit_code == 0, result.output
    out = result.output
    for field in ("requests:", "cache hits:", "first audio:", "real time:", "AR steps:", "model load:"):
        assert field in out, out


def _send_synthesize(daemon: DaemonProcess, params: dict[str, Any]) -> RpcClient:
    c = daemon.client(timeout=120)
    c.send(protocol.request(1, "synthesize", params))
    return c


def _read_audio(c: RpcClient, out: list[Any], i: int) -> None:
    try:
        frame = c.recv()
        out[i] = frame["result"]["audio"] if frame and frame.get("ok") else frame
    finally:
        c.close()


def _engine_runs(daemon: DaemonProcess) -> tuple[int, int]:
    counters = daemon.call("status")["counters"]
    return counters["engine_runs"], counters["coalesced"]


def test_identical_misses_share_one_model_run(daemon: DaemonProcess) -> None:
    params = {"text": "Five clients ask for the very same sentence at once.", "language": "en", "seed": 5}
    runs, joined = _engine_runs(daemon)
    clients = [_send_synthesize(daemon, params) for _ in range(5)]
    results: list[Any] = [None] * 5
    threads = [threading.Thread(target=_read_audio, args=(c, results, i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(isinstance(r, bytes) for r in results), results
    assert len(set(results)) == 1  # identical bytes
    assert _engine_runs(daemon) == (runs + 1, joined + 4)


def test_first_client_leaving_does_not_stop_the_others(daemon: DaemonProcess) -> None:
    runs, joined = _engine_runs(daemon)
    # A different request holds the model first, so the shared run is surely still queued when
    # its first client hangs up.
    blocker = _send_synthesize(daemon, {"text": "A long blocking sentence keeps the model busy for a while. "
                                                "And then it goes on with a second sentence as well.",
                                        "language": "en", "long": False})
    params = {"text": "Only the first of five clients hangs up.", "language": "en", "seed": 9}
    first = _send_synthesize(daemon, params)
    time.sleep(0.2)
    others = [_send_synthesize(daemon, params) for _ in range(4)]
    time.sleep(0.2)
    first.close()  # EOF: the daemon cancels this client's request
    results: list[Any] = [None] * 4
    threads = [threading.Thread(target=_read_audio, args=(c, results, i)) for i, c in enumerate(others)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    _read_audio(blocker, [None], 0)
    assert all(isinstance(r, bytes) for r in results), results
    assert len(set(results)) == 1
    runs_after, joined_after = _engine_runs(daemon)
    assert runs_after == runs + 2  # the blocker and ONE shared run
    assert joined_after == joined + 4
