"""The fast slice of the reliability suite (bench/reliability.py, issue 12), in the default run:
2,000 fuzzed socket frames, every HTTP bad-input case, 3 kill -9 rounds, full and read-only cache.

Real daemons on tiny weights. Only outcomes are checked (no timings); run
`bench/reliability.py` for the full counts and the table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import reliability as suite


@pytest.fixture(scope="module")
def fuzz_daemon(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = suite.daemon(tmp_path_factory.mktemp("fuzz") / "d", tiny_models,
                     "--http-port", "0", "--http-token", suite.HTTP_TOKEN)
    yield d
    assert d.stop() == 0, d.log_text()[-3000:]


def test_fuzzed_socket_frames(fuzz_daemon: Any) -> None:
    report = suite.Report()
    result = suite.fuzz_section(fuzz_daemon, 2000, report)
    table = report.table()
    assert result["codes"].get("INTERNAL", 0) == 0, table
    assert result["crashes"] == 0 and result["hangs"] == 0, table
    assert result["tracebacks"] == 0, table
    assert result["codes"]["PROTOCOL_ERROR"] > 0 and result["codes"]["ok"] > 0  # both kinds exercised
    assert fuzz_daemon.call("ping")["pong"] is True


def test_http_bad_inputs_never_500(fuzz_daemon: Any) -> None:
    report = suite.Report()
    result = suite.http_section(fuzz_daemon, report)
    assert result["bad"] == [], report.table()
    assert result["tracebacks"] == 0, report.table()
    assert set(result["statuses"]) <= {200, 400, 404, 413}, report.table()


def test_kill9_rounds_leave_nothing(tiny_models: Any, tmp_path: Path) -> None:
    report = suite.Report()
    result = suite.kill_section(tmp_path / "kill", tiny_models, 3, report)
    assert result["orphans"] == 0, report.table()
    assert result["leftovers"] == [], report.table()
    assert result["exit"] == 0


def test_full_and_read_only_cache(tiny_models: Any, tmp_path: Path) -> None:
    report = suite.Report()
    result = suite.storage_section(tmp_path / "storage", tiny_models, report)
    if not result["mounted"]:
        pytest.skip("cannot mount a tmpfs here (needs root); tests/storage/test_cache.py covers the logic")
    # audio still returned; `return: path` is 503-class UNAVAILABLE; /generate answers 503
    assert result["full"] == "ok / UNAVAILABLE/CACHE_WRITE_FAILED / 503", report.table()
    assert result["read-only"] == "ok / UNAVAILABLE/CACHE_WRITE_FAILED / 503", report.table()
    assert result["leftovers"] == "0" and result["exit"] == "0", report.table()
