"""The systemd units: `systemd-analyze verify` is clean, the key directives are there, and the
system service's exposure score stays at or below 3.5."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SYSTEMD = ROOT / "systemd"
VALLEXD_BIN = Path(sys.executable).with_name("vallexd")


def directives(path: Path) -> dict[str, list[str]]:
    """KEY -> every value it is given (units may repeat a key)."""
    result: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        result.setdefault(key.strip(), []).append(value.strip())
    return result


def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd) - cannot verify the units")
    return exe


def staged(tmp_path: Path, *names: str) -> list[Path]:
    """Copies of the units whose ExecStart points at this checkout's `vallexd`, which exists:
    verify checks that the binary is there, and /opt/vallexd is not on a test machine."""
    out = []
    for name in names:
        text = (SYSTEMD / name).read_text()
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={VALLEXD_BIN}", text, flags=re.M)
        dest = tmp_path / Path(name).name
        dest.write_text(text)
        out.append(dest)
    return out


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_system_units_verify_clean(tmp_path: Path) -> None:
    exe = analyze()
    units = staged(tmp_path, "vallexd.service", "vallexd.socket")
    done = run([exe, "verify", *map(str, units)])
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_user_units_verify_clean(tmp_path: Path) -> None:
    exe = analyze()
    units = staged(tmp_path, "user/vallexd.service", "user/vallexd.socket")
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    done = run([exe, "--user", "verify", *map(str, units)], env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_system_service_exposure_at_most_3_5(tmp_path: Path) -> None:
    exe = analyze()
    (unit,) = staged(tmp_path, "vallexd.service")
    done = run([exe, "security", "--offline=yes", str(unit)])
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    if match is None and "--offline" in done.stderr:
        pytest.skip(f"this systemd-analyze has no offline security mode: {done.stderr.strip()[:200]}")
    assert match, done.stdout[-2000:] + done.stderr
    assert float(match.group(1)) <= 3.5, done.stdout


def test_system_service_key_directives() -> None:
    d = directives(SYSTEMD / "vallexd.service")
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify"
    assert int(one["WatchdogSec"]) > 0
    assert one["KillMode"] == "control-group"
    for key in ("StateDirectory", "CacheDirectory", "RuntimeDirectory"):
        assert one[key] == "vallexd", key
    assert one["User"] == "vallexd" or one.get("DynamicUser") == "yes"
    assert one["ProtectSystem"] == "strict"
    assert one["ProtectHome"] == "yes"
    assert one["PrivateTmp"] == "yes"
    assert one["NoNewPrivileges"] == "yes"
    assert one["CapabilityBoundingSet"] == ""
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one["DevicePolicy"] == "closed"
    allowed = [v.split()[0] for v in d["DeviceAllow"]]
    assert {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0"} <= set(allowed)
    # Every GPU node and the MIG capability nodes (/dev/nvidia-caps/*), by device group.
    assert {"char-nvidia-frontend", "char-nvidia-caps", "char-nvidia-uvm"} <= set(allowed)
    # nvidia-modprobe runs before the sandbox ("+": as root), tolerated where absent ("-").
    (pre,) = d["ExecStartPre"]
    prefix, _, command = pre.partition("/")
    assert set(prefix) == {"-", "+"} and command.split()[1:] == ["-u", "-c0"]
    assert command.split()[0].endswith("nvidia-modprobe")
    assert "MemoryDenyWriteExecute" not in d  # torch JITs: see the comment in the unit
    assert one["Requires"] == "vallexd.socket"


def test_socket_units() -> None:
    system = {k: v[-1] for k, v in directives(SYSTEMD / "vallexd.socket").items()}
    assert system["ListenStream"] == "/run/vallexd/vallexd.sock"
    assert system["SocketMode"] == "0660"
    assert system["SocketGroup"] == "vallexd"
    user = {k: v[-1] for k, v in directives(SYSTEMD / "user" / "vallexd.socket").items()}
    assert user["ListenStream"] == "%t/vallexd/vallexd.sock"
    assert user["SocketMode"] == "0600"


def test_socket_paths_match_the_daemons_defaults() -> None:
    """The unit's socket is where the daemon and vallexctl look by default under each manager."""
    from vallexd.config import default_paths

    system = default_paths({"RUNTIME_DIRECTORY": "/run/vallexd", "HOME": "/var/lib/vallexd"})
    assert str(system.socket_path) == "/run/vallexd/vallexd.sock"
    user = default_paths({"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/u"})
    assert str(user.socket_path) == "/run/user/1000/vallexd/vallexd.sock"
