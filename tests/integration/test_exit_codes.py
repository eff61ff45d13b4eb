"""Issue 14 item 8: the exit-code table of the README, the code (vallexctl.output) and `--help` agree,
and every row happens through the real CLI against a real daemon on tiny weights.

(130 and 141 are exercised in test_newcomer.py: Ctrl-C during a fetch, a closed stdout.)
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_harness import VALLEXCTL, ScratchUser, error_line, preset_file
from daemon_harness import DaemonProcess, RpcClient, daemon_env
from loopback_http import serving

from vallexctl import output
from vallexctl.cli import EPILOG

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_exit_codes() -> dict[int, str]:
    """{code: meaning} from the README's "Exit codes" table."""
    section = README.read_text(encoding="utf-8").split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", section, flags=re.M)
    return {int(code): meaning.strip() for code, meaning in rows}


def test_readme_code_and_help_agree() -> None:
    constants = {name: value for name, value in vars(output).items() if name.startswith("EXIT_")}
    table = readme_exit_codes()
    assert set(table) == set(constants.values()) == {0, 1, 2, 3, 4, 5, 130, 141}
    assert table[output.EXIT_BUSY].startswith("retry later")
    assert table[output.EXIT_NOT_FOUND] == "not found"
    help_text = " ".join(EPILOG.split())
    for code in table:
        assert re.search(rf"\b{code} ", help_text), code


@pytest.fixture(scope="module")
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    # One batch row and no waiting room: a second synthesis while one runs is BUSY.
    return daemon_factory("exits", ["--queue-limit", "0", "--max-batch", "1", "--threads", "1",
                                    "--no-static"])


def ctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VALLEXCTL, "--socket", str(daemon.socket_path), *args], capture_output=True,
                          text=True, timeout=120, env=daemon_env())


def test_0_success(daemon: DaemonProcess) -> None:
    done = ctl(daemon, "status")
    assert done.returncode == 0 and done.stderr == ""


def test_1_digest_mismatch(daemon: DaemonProcess, tmp_path: Path) -> None:
    done = ctl(daemon, "preset", "install", str(preset_file(tmp_path / "p.npz")), "--sha256", "0" * 64)
    assert done.returncode == 1 and "sha256" in error_line(done)


def test_2_usage(daemon: DaemonProcess) -> None:
    done = ctl(daemon, "speak", "--temperature", "0", "hi")
    assert done.returncode == 2 and "--help" in error_line(done)


def test_2_daemon_configuration_that_cannot_work_here(tiny_models: object, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("float16 is refused on the CPU only; this machine has CUDA")
    user = ScratchUser(tmp_path)
    user.install_models(tiny_models)
    done = user.ctl("daemon", "start", "--", "--threads", "1", "--static-port", "0", "--dtype", "float16")
    assert done.returncode == 2
    line = error_line(done)
    assert "float16" in line and "--dtype" in line
    assert not (user.socket_path.parent / "vallexd.pid").exists()


def test_3_unreachable(tmp_path: Path) -> None:
    done = subprocess.run([VALLEXCTL, "--socket", str(tmp_path / "none.sock"), "status"], capture_output=True,
                          text=True, timeout=60, env=daemon_env())
    assert done.returncode == 3 and "vallexctl quickstart" in error_line(done)


def test_4_not_found(daemon: DaemonProcess, tmp_path: Path) -> None:
    voice = ctl(daemon, "speak", "-v", "nobody", "hi")
    assert voice.returncode == 4 and "presets list" in error_line(voice)
    with serving(tmp_path) as server:  # a download URL that answers 404
        missing = ctl(daemon, "preset", "install", f"{server.url}/missing.npz")
    assert missing.returncode == 4 and "HTTP 404" in error_line(missing)


def test_5_busy(daemon: DaemonProcess) -> None:
    outcome: dict[str, object] = {}

    def long_request() -> None:
        with RpcClient(daemon.socket_path, 300) as c:
            outcome["result"] = c.request("synthesize", {"text": "a long goodbye, " * 30, "seed": 1,
                                                         "language": "en", "return": "path"})

    worker = threading.Thread(target=long_request)
    worker.start()
    try:
        start = time.monotonic()
        while daemon.call("status")["in_flight"] != 1:
            assert time.monotonic() - start < 60, "the long request never reached the model"
            time.sleep(0.02)
        done = ctl(daemon, "speak", "Another one.")
    finally:
        worker.join(300)
    assert done.returncode == 5, done.stderr
    line = error_line(done)
    assert "queue is full" in line and line.count("retry") == 1
