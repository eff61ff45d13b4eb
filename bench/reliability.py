"""Reliability suite (issue 12): real daemons on tiny weights, hostile and heavy inputs, one table.

    PYTHONPATH=. .venv/bin/python bench/reliability.py            # the full suite
    PYTHONPATH=. .venv/bin/python bench/reliability.py --quick    # the fast slice the tests run

Sections (each starts its own `python -m vallexd --threads 1` on tiny random weights):

- fuzz: seeded-random socket frames, made by bench/reliability_inputs.py (valid and broken
  envelopes, wrong types, deep nesting, huge strings, garbage msgpack, truncated and oversize
  frames, hostile .npz uploads with huge declared shapes, every method); counts replies by code,
  INTERNAL replies, daemon crashes, the worst `ping` latency on a second connection while
  fuzzing, log lines per frame and tracebacks logged while fuzzing;
- http: bad-input cases on /generate and /v1/synthesize (deep JSON, bad JSON, wrong content
  type, wrong types, unknown fields, junk request lines); status counts, no 500 allowed;
- kill: `kill -9` mid-synthesis, then restart on the same folders: orphaned children, leftover
  temp or partial files, restart time (start to first `ping`) p50/max;
- load: 200 clients at once each asking for a synthesis: answered / BUSY / other / hung,
  daemon peak RSS (VmHWM);
- hits: cache-hit latency p50/p99 and requests/s with 8 clients;
- storage: a full and a read-only cache (tmpfs, when this process may mount one).

Tests call the section functions with small counts (tests/reliability/); the numbers here are
measurements for the report, the tests check only correctness.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from daemon_harness import DaemonProcess, RpcClient, child_pids, pid_alive, start_daemon  # noqa: E402
from reliability_inputs import RAW_HTTP, fuzz_frame, http_cases  # noqa: E402

from vallexd import protocol  # noqa: E402

DAEMON_ARGS = ["--threads", "1", "--log-level", "info"]
HTTP_TOKEN = "reliability-token"


@dataclass
class Report:
    """Rows of the one table: (section, metric, value, target)."""

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, section: str, metric: str, value: Any, target: str = "") -> None:
        self.rows.append((section, metric, str(value), target))

    def table(self) -> str:
        head = ("section", "metric", "value", "target")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]
        lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
                 "-+-".join("-" * w for w in widths)]
        lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in self.rows]
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def tiny_models(folder: Path) -> Any:
    from vallexd.tools.tiny_weights import make_tiny

    return make_tiny(folder)


def daemon(workdir: Path, models: Any, *extra: str) -> DaemonProcess:
    return start_daemon(workdir, models, [*DAEMON_ARGS, *extra])


# ------------------------------------------------------------------ fuzzed frames

def _exchange(sock: socket.socket, data: bytes, expect_reply: bool) -> dict[str, Any] | None:
    sock.sendall(data)
    if not expect_reply and data[:4] == protocol.HEADER.pack(100) and len(data) < 104:
        sock.shutdown(socket.SHUT_WR)
    return protocol.recv_frame(sock)


def _ping_ms(path: Path) -> float:
    started = time.perf_counter()
    with RpcClient(path, timeout=30) as c:
        c.call("ping")
    return (time.perf_counter() - started) * 1000


def fuzz_section(d: DaemonProcess, frames: int, report: Report, seed: int = 12) -> dict[str, Any]:
    rng = random.Random(seed)
    codes: Counter[str] = Counter()
    pings: list[float] = []
    crashes = hangs = 0
    log_before = len(d.log_text().splitlines())
    log_chars = len(d.log_text())  # tracebacks are counted from here on (not the daemon's start)
    sock: socket.socket | None = None
    started = time.monotonic()
    for i in range(frames):
        if sock is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            sock.connect(str(d.socket_path))
        data, keeps = fuzz_frame(rng, i)
        try:
            reply = _exchange(sock, data, keeps)
        except (TimeoutError, ConnectionError, OSError) as exc:
            if isinstance(exc, socket.timeout):
                hangs += 1
            reply = None
        except Exception:  # a reply we cannot parse
            reply = None
            codes["unparseable"] += 1
        if reply is None:
            codes["closed"] += 1
        elif "error" in reply and isinstance(reply["error"], dict):
            codes[str(reply["error"].get("code"))] += 1
        else:
            codes["ok" if reply.get("ok") else "other"] += 1
        if reply is None or not keeps or (reply is not None and reply.get("id") is None and "error" in reply):
            with contextlib.suppress(OSError):
                sock.close()
            sock = None
        if i % 500 == 0:
            if d.proc.poll() is not None:
                crashes += 1
                break
            pings.append(_ping_ms(d.socket_path))
    if sock is not None:
        sock.close()
    seconds = time.monotonic() - started
    if d.proc.poll() is not None:
        crashes += 1
    log_lines = len(d.log_text().splitlines()) - log_before
    during = d.log_text()[log_chars:]
    tracebacks = during.count("Traceback")
    if tracebacks:
        report.add("fuzz", "first traceback", first_traceback(during))
    report.add("fuzz", "socket frames sent", frames, ">= 100,000 (full)")
    report.add("fuzz", "frames/s", f"{frames / seconds:.0f}")
    report.add("fuzz", "INTERNAL replies", codes.get("INTERNAL", 0), "0")
    report.add("fuzz", "daemon crashes", crashes, "0")
    report.add("fuzz", "hung replies (30 s)", hangs, "0")
    report.add("fuzz", "worst ping while fuzzing (ms)", f"{max(pings):.1f}" if pings else "-")
    report.add("fuzz", "log lines per frame", f"{log_lines / max(frames, 1):.2f}", "<= 1")
    report.add("fuzz", "tracebacks in log", tracebacks, "0")
    report.add("fuzz", "replies by code", ", ".join(f"{k} {v}" for k, v in codes.most_common()))
    return {"codes": codes, "crashes": crashes, "hangs": hangs, "pings": pings, "tracebacks": tracebacks,
            "log_lines": log_lines}


def first_traceback(log: str) -> str:
    """The log line before the first traceback and the traceback's last line, on one line."""
    at = log.find("Traceback")
    before = log[:at].rstrip("\n").rsplit("\n", 1)[-1]
    after = log[at:].split("\n")
    last = next((line for line in after[1:] if line and not line.startswith(" ")), "?")
    return f"{before[-120:]} ... {last[:160]}"


# ------------------------------------------------------------------ HTTP bad input


def http_raw(port: int, payload: bytes, timeout: float = 30) -> int:
    """Send raw bytes; return the HTTP status of the answer (0 if the server just closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        with contextlib.suppress(socket.timeout, ConnectionError):
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def http_post(port: int, path: str, body: bytes, content_type: str = "application/json",
              extra: bytes = b"") -> int:
    return http_raw(port, b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
                          b"Content-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n%s"
                    % (path.encode(), port, HTTP_TOKEN.encode(), content_type.encode(), len(body), extra,
                       body))


def http_section(d: DaemonProcess, report: Report) -> dict[str, Any]:
    assert d.http_url is not None
    port = int(d.http_url.rsplit(":", 1)[1])
    statuses: Counter[int] = Counter()
    fivehundreds: list[str] = []
    log_chars = len(d.log_text())
    for name, path, body, ctype in http_cases():
        status = http_post(port, path, body, ctype)
        statuses[status] += 1
        if status >= 500 or status == 0:
            fivehundreds.append(f"{path} {name}: {status}")
    for name, payload in RAW_HTTP:
        status = http_raw(port, payload)
        statuses[status] += 1
        if status >= 500:
            fivehundreds.append(f"raw {name}: {status}")
    during = d.log_text()[log_chars:]
    tracebacks = during.count("Traceback")
    if tracebacks:
        report.add("http", "first traceback", first_traceback(during))
    total = sum(statuses.values())
    report.add("http", "bad-input cases", total)
    report.add("http", "status counts", ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items())))
    report.add("http", "5xx or no answer", len(fivehundreds), "0")
    report.add("http", "tracebacks in log", tracebacks, "0")
    return {"statuses": statuses, "bad": fivehundreds, "tracebacks": tracebacks}


# ------------------------------------------------------------------ kill -9


def _leftovers(workdir: Path) -> list[str]:
    found = []
    for path in (workdir / "cache").rglob("*"):
        if path.name.startswith(".tmp-") or (path.suffix == ".wav" and path.stat().st_size < 44):
            found.append(str(path))
        elif path.is_dir() and path.parent == workdir / "cache" and not any(path.iterdir()):
            found.append(str(path) + "/ (empty shard)")
    for path in (workdir / "presets").rglob(".*"):
        found.append(str(path))
    return found


def kill_section(workdir: Path, models: Any, rounds: int, report: Report) -> dict[str, Any]:
    restart_s: list[float] = []
    orphans = 0
    leftovers: list[str] = []
    mid = 0
    text = "This sentence is long enough to keep the tiny model busy for a while, " * 3
    for n in range(rounds):
        started = time.monotonic()
        d = daemon(workdir, models)
        restart_s.append(time.monotonic() - started)
        children = child_pids(d.pid)
        worker = threading.Thread(target=_synth_quietly, args=(d.socket_path, text, n), daemon=True)
        worker.start()
        deadline = time.monotonic() + 60  # the first request waits for the text warm-up
        while time.monotonic() < deadline:  # wait until the job is on the model thread
            with contextlib.suppress(Exception):
                if d.call("status", timeout=5)["in_flight"] >= 1:
                    mid += 1
                    break
            time.sleep(0.05)
        time.sleep(random.Random(n).uniform(0.0, 0.3))  # somewhere inside the synthesis
        os.kill(d.pid, signal.SIGKILL)
        d.proc.wait(10)
        worker.join(10)
        gone_by = time.monotonic() + 2.0
        while time.monotonic() < gone_by and any(pid_alive(c) for c in children):
            time.sleep(0.02)
        orphans += sum(pid_alive(c) for c in children)
        for c in children:  # never leave one behind for the next round
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, signal.SIGKILL)
    # The last restart sweeps what the kills left; count what is still there afterwards.
    started = time.monotonic()
    d = daemon(workdir, models, "--no-static")
    restart_s.append(time.monotonic() - started)
    d.call("ping")
    leftovers = _leftovers(workdir)
    code = d.stop()
    report.add("kill -9", "rounds (killed mid-synthesis)", f"{rounds} ({mid})", ">= 50 (full)")
    report.add("kill -9", "orphaned children", orphans, "0")
    report.add("kill -9", "leftover temp/partial files", len(leftovers), "0")
    report.add("kill -9", "restart to ping p50 / max (s)",
               f"{statistics.median(restart_s):.2f} / {max(restart_s):.2f}")
    report.add("kill -9", "clean SIGTERM exit after", code, "0")
    return {"orphans": orphans, "leftovers": leftovers, "restart_s": restart_s, "mid": mid, "exit": code}


def _synth_quietly(path: Path, text: str, seed: int) -> None:
    with contextlib.suppress(Exception), RpcClient(path, timeout=60) as c:
        c.request("synthesize", {"text": text, "language": "en", "seed": seed, "return": "path"})


# ------------------------------------------------------------------ 200 clients


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def load_section(d: DaemonProcess, clients: int, report: Report, timeout_s: float = 300) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    rss_before = _vm(d.pid, "VmRSS")
    barrier = threading.Barrier(clients)

    def one(i: int) -> None:
        client = None
        try:
            client = _connect_patiently(d.socket_path, timeout_s)
        except OSError as exc:
            result = f"other:connect {type(exc).__name__}"
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(60)  # every client connected (or failed to): now all ask at once
        if client is not None:
            try:
                params = {"text": f"Client number {i} says hello.", "language": "en", "seed": i,
                          "return": "path"}
                with contextlib.suppress(BrokenPipeError):  # refused at connect: the BUSY frame waits
                    client.send(protocol.request(1, "synthesize", params))
                reply = client.recv()
                if reply is None:
                    result = "other:closed without an answer"
                elif reply.get("ok"):
                    result = "answered"
                else:  # over max_connections the daemon answers BUSY (id null) at connect and closes
                    code = reply["error"]["code"]
                    result = "BUSY" if code == "BUSY" else f"other:{code}"
            except TimeoutError:
                result = "hung"
            except Exception as exc:
                result = f"other:{type(exc).__name__}"
            finally:
                client.close()
        with lock:
            outcomes[result] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 60)
    seconds = time.monotonic() - started
    peak = _vm(d.pid, "VmHWM")
    answered, busy = outcomes.get("answered", 0), outcomes.get("BUSY", 0)
    other = sum(v for k, v in outcomes.items() if k.startswith("other"))
    report.add("load", "concurrent clients", clients, "200 (full)")
    report.add("load", "answered / BUSY / other / hung",
               f"{answered} / {busy} / {other} / {outcomes.get('hung', 0)}", "other 0, hung 0")
    if other:
        report.add("load", "other outcomes",
                   ", ".join(f"{k} {v}" for k, v in outcomes.items() if "other" in k))
    report.add("load", "daemon RSS before / peak (MiB)", f"{rss_before / 2**20:.0f} / {peak / 2**20:.0f}")
    report.add("load", "wall time (s)", f"{seconds:.1f}")
    return {"outcomes": outcomes, "peak_rss": peak, "rss_before": rss_before}


def _connect_patiently(path: Path, timeout_s: float) -> RpcClient:
    """Connect as a real client does: a full listen backlog (EAGAIN) is retried for up to 10 s."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return RpcClient(path, timeout=timeout_s)
        except (BlockingIOError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# ------------------------------------------------------------------ cache hits


def hits_section(d: DaemonProcess, report: Report, clients: int = 8, per_client: int = 250) -> dict[str, Any]:
    params = {"text": "A cached sentence.", "language": "en", "seed": 1}
    d.call("synthesize", params, timeout=120)  # the miss that fills the entry
    latencies: list[float] = []
    lock = threading.Lock()

    def one() -> None:
        mine = []
        with RpcClient(d.socket_path, timeout=60) as c:
            for _ in range(per_client):
                t = time.perf_counter()
                result = c.call("synthesize", params)
                mine.append((time.perf_counter() - t) * 1000)
                assert result["cached"] is True
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    report.add("hits", f"cache hits ({clients} clients x {per_client})", len(latencies))
    report.add("hits", "latency p50 / p99 (ms)",
               f"{percentile(latencies, 0.5):.1f} / {percentile(latencies, 0.99):.1f}")
    report.add("hits", "requests/s", f"{len(latencies) / seconds:.0f}")
    return {"latencies": latencies, "rps": len(latencies) / seconds}


# ------------------------------------------------------------------ full / read-only cache


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def storage_section(workdir: Path, models: Any, report: Report) -> dict[str, Any]:
    cache = workdir / "cache"
    if not _mount_tmpfs(cache, "16k"):  # a tiny-model WAV is 20-60 KB: none fits
        report.add("storage", "full / read-only cache",
                   "not measured: cannot mount a tmpfs here (needs root)")
        return {"mounted": False}
    outcomes: dict[str, str] = {}
    try:
        d = daemon(workdir, models, "--http-port", "0", "--http-token", HTTP_TOKEN)
        try:
            port = int(str(d.http_url).rsplit(":", 1)[1])
            outcomes["full"] = _storage_outcome(d, port, "The cache is full.")
            subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
            outcomes["read-only"] = _storage_outcome(d, port, "Read only now.")
            outcomes["leftovers"] = str(len(_leftovers(workdir)))
        finally:
            outcomes["exit"] = str(d.stop())
    finally:
        subprocess.run(["umount", str(cache)], check=False)
    report.add("storage", "full cache: audio / path / HTTP", outcomes["full"], "ok / UNAVAILABLE / 503")
    report.add("storage", "read-only cache: audio / path / HTTP", outcomes["read-only"],
               "ok / UNAVAILABLE / 503")
    report.add("storage", "leftover files, exit code", f"{outcomes['leftovers']}, {outcomes['exit']}", "0, 0")
    return {"mounted": True, **outcomes}


def _storage_outcome(d: DaemonProcess, port: int, text: str) -> str:
    with RpcClient(d.socket_path, timeout=120) as c:
        _, audio = c.request("synthesize", {"text": text, "language": "en", "seed": 4})
        _, path = c.request("synthesize", {"text": text, "language": "en", "seed": 5, "return": "path"})
    audio_result = ("ok" if audio["ok"] and audio["result"].get("audio")
                    else audio.get("error", {}).get("code"))
    path_result = "ok" if path["ok"] else f"{path['error']['code']}/{path['error'].get('reason')}"
    status = http_post(port, "/generate", json.dumps({"textPrompt": text, "language": "English"}).encode())
    return f"{audio_result} / {path_result} / {status}"


# ------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> Report:
    report = Report()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    report.add("machine", "cpu / cores", f"{cpu} / {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="vallexd-reliability-") as tmp:
        root = Path(tmp)
        models = tiny_models(root / "tiny")
        only = set(args.only.split(",")) if args.only else {"fuzz", "http", "kill", "load", "hits", "storage"}
        if only & {"fuzz", "http"}:
            d = daemon(root / "fuzz", models, "--http-port", "0", "--http-token", HTTP_TOKEN)
            try:
                if "fuzz" in only:
                    fuzz_section(d, args.frames, report)
                if "http" in only:
                    http_section(d, report)
                report.add("fuzz", "daemon alive, clean SIGTERM exit", d.stop(), "0")
            finally:
                d.kill()
        if "kill" in only:
            kill_section(root / "kill", models, args.kill_rounds, report)
        if only & {"load", "hits"}:
            d = daemon(root / "load", models)
            try:
                if "load" in only:
                    load_section(d, args.clients, report)
                if "hits" in only:
                    hits_section(d, report, per_client=args.hit_requests)
            finally:
                report.add("load", "clean SIGTERM exit", d.stop(), "0")
        if "storage" in only:
            storage_section(root / "storage", models, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--kill-rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--hit-requests", type=int, default=250, help="per client, 8 clients")
    parser.add_argument("--quick", action="store_true", help="the fast slice: 2,000 frames, 3 kill rounds")
    parser.add_argument("--only", help="comma-separated sections: fuzz,http,kill,load,hits,storage")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.kill_rounds, args.clients, args.hit_requests = 2000, 3, 50, 25
    started = time.monotonic()
    report = run(args)
    report.add("suite", "wall time (s)", f"{time.monotonic() - started:.0f}")
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
