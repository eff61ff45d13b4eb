"""Replicas on Ray Serve: aggregate throughput with 1 and 2 replicas, as a ratio measured in one run.

    .venv/bin/python bench/bench_replicas.py [--requests 8] [--d-model 512 --layers 6]

Each configuration is a real `vallexd-ray` process (a local Ray instance, the HTTP ingress, model
replicas with one CPU and one torch thread each) on the same random weights in the real file
formats; the same N seeded requests (distinct texts, so no cache hits) are sent at once over HTTP.
Printed: audio seconds made per wall second, and its ratio to the 1-replica row of this run; a
`RESULT` line per row.  The plain daemon (`vallexd`, no Ray) runs the same requests first, so the
table also shows what Ray's routing costs on one replica.  On this project's 2-core machine two
replicas share the two cores with Ray's own processes, so 2x is the ceiling, not the expectation.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_serving import cpu_features  # noqa: E402

TEXTS = ("The morning train was late again today.", "She opened the window and listened to the rain.",
         "Numbers are easier to read than to say.", "We walked along the river until it got dark.",
         "A small dog waited patiently by the door.", "Nobody expected the meeting to end so soon.",
         "He wrote the letter twice before sending it.", "The garden smelled of cut grass and mint.")


def start(command: list[str], ready: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server and return it with the URL its ready line names (`ready` prefix)."""
    out = log.open("wb")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=out, stdin=subprocess.DEVNULL)
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            out.write(raw)
            out.flush()
            line = raw.decode(errors="replace")
            if ready in line:
                found.append(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 300
    while not found and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not found:
        stop(proc)
        raise SystemExit(f"server did not start; see {log}")
    return proc, found[0]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM first (vallexd-ray then stops its local Ray instance too), SIGKILL if it hangs."""
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def daemon_url(socket: Path) -> str:
    """The daemon's HTTP URL once `status` says ready."""
    vallexctl = str(Path(sys.executable).parent / "vallexctl")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = subprocess.run([vallexctl, "--socket", str(socket), "--json", "status"],
                                capture_output=True, text=True)
        if status.returncode == 0 and json.loads(status.stdout).get("state") == "ready":
            return str(json.loads(status.stdout)["http_url"])
        time.sleep(1)
    raise SystemExit("the daemon did not become ready")


def post(url: str, body: dict[str, Any]) -> float:
    """Seconds of audio in the answer to one synthesis."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=1800)
    conn.request("POST", "/v1/synthesize", body=json.dumps({**body, "return": "path"}).encode(),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    doc = json.loads(response.read())
    conn.close()
    if response.status != 200:
        raise SystemExit(f"request failed: {doc}")
    return float(doc["duration_s"])


def measure(url: str, n: int, first: int = 0) -> dict[str, float]:
    bodies = [{"text": f"{TEXTS[i % len(TEXTS)]} Request {i}.", "language": "en", "seed": i}
              for i in range(first, first + n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        audio = sum(pool.map(lambda body: post(url, body), bodies))
    wall = time.perf_counter() - started
    return {"audio_s": audio, "wall_s": wall, "audio_per_s": audio / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="concurrent requests per configuration")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    args = parser.parse_args()
    from vallexd.tools.tiny_weights import make_tiny

    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    models = make_tiny(work / "models", d_model=args.d_model, heads=args.heads, layers=args.layers)
    print(f"# machine: {platform.machine()}, {cpu_features()}")
    print(f"# model: random weights d_model={args.d_model} layers={args.layers}; {args.requests} concurrent "
          "requests over HTTP; 1 CPU and 1 torch thread per model process")
    rows = []
    configs = [("daemon", None), ("ray", 1), ("ray", 2)]
    for kind, replicas in configs:
        folder = work / f"{kind}-{replicas}"
        (folder / "presets").mkdir(parents=True)
        common = ["--checkpoint", str(models.checkpoint), "--vocos", str(models.vocos_dir),
                  "--cache-dir", str(folder / "cache"), "--presets-dir", str(folder / "presets"),
                  "--device", "cpu", "--threads", "1", "--http-port", "0", "--no-static",
                  "--log-level", "warning"]
        proc: subprocess.Popen[bytes] | None = None
        try:  # a failed request or start must not leave a daemon or a Ray instance running
            if kind == "daemon":
                command = [sys.executable, "-m", "vallexd", "--socket", str(folder / "d.sock"), *common]
                with (folder / "log").open("wb") as log:
                    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
                url = daemon_url(folder / "d.sock")
            else:
                command = [sys.executable, "-m", "vallexd.serve.ray", *common, "--ray-replicas",
                           str(replicas), "--ray-replica-cpus", "1"]
                proc, line = start(command, "vallexd-ray: READY", folder / "log")
                url = line.split()[-1]
            measure(url, 1, first=1000)  # warm-up: the text front end's dictionaries, first allocations
            result = measure(url, args.requests)
        finally:
            if proc is not None:
                stop(proc)
        rows.append((kind, replicas or 1, result))
    base = next(r for k, n, r in rows if k == "ray" and n == 1)["audio_per_s"]
    print(f"{'server':8} {'replicas':>8} {'audio_s':>8} {'wall_s':>8} {'audio/s':>8} {'thru_x':>7}")
    for kind, replicas, r in rows:
        print(f"{kind:8} {replicas:>8} {r['audio_s']:>8.1f} {r['wall_s']:>8.1f} {r['audio_per_s']:>8.2f} "
              f"{r['audio_per_s'] / base:>7.2f}")
    for kind, replicas, r in rows:
        print(f"RESULT server={kind} replicas={replicas} requests={args.requests} "
              f"throughput_x={r['audio_per_s'] / base:.2f}")


if __name__ == "__main__":
    main()
