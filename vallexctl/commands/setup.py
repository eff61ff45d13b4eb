"""Setting up: `models fetch|verify`, `daemon start|stop`, and `quickstart` (nothing → a spoken sentence)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from vallexctl import model_files as mdl
from vallexctl.client import ping
from vallexctl.context import state
from vallexctl.download import DownloadFailed
from vallexctl.output import ProgressLine, emit, json_option, note, stderr_is_tty
from vallexctl.units import format_size
from vallexd.constants import WHISPER_DEFAULT_SIZE
from vallexd.errors import NotFound, Unavailable, VallexError

READY_TIMEOUT_S = 300.0  # loading the 1.5 GB checkpoint on a slow disk can take minutes
QUICKSTART_TEXT = "Hello! This is vallexd, speaking from your own computer."


def default_models_dir() -> Path:
    from vallexd.config import default_paths

    return default_paths().models_dir


def _progress_for(enabled: bool) -> Any:
    return lambda mf: ProgressLine(mf.relpath, enabled=enabled)


def _hash_progress_for(enabled: bool) -> Any:
    """Re-hashing a present 1.5 GB checkpoint takes seconds: show that something happens."""
    return lambda mf: ProgressLine(f"checking {mf.relpath}", enabled=enabled)


# --------------------------------------------------------------------------- models


@click.group()
def models() -> None:
    """Download and check the model weights."""


dir_option = click.option(
    "--dir", "models_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Models folder [default: the daemon's, $XDG_DATA_HOME/vallexd/models].",
)


@models.command("fetch")
@dir_option
@click.option("--base-url", envvar=mdl.BASE_URL_ENV, metavar="URL",
              help="Fetch from a mirror laid out like the models folder instead of the public URLs "
                   f"[env {mdl.BASE_URL_ENV}].")
@click.option("--no-encodec", is_flag=True, help="Skip the EnCodec weights (only needed for --from-audio).")
@click.option("--encodec", "only_encodec", is_flag=True,
              help="Fetch only the EnCodec weights (to make voices from recordings).")
@click.option("--whisper", "whisper", is_flag=True,
              help="Fetch only Whisper (transcribes recordings sent without a transcript; the daemon "
                   "needs the asr extra). With --encodec: both.")
@click.option("--whisper-size", type=click.Choice(tuple(mdl.WHISPER_SHA256)), default=WHISPER_DEFAULT_SIZE,
              show_default=True, help="Which Whisper (the daemon reads <models>/whisper/medium.pt unless "
                                      "its `whisper` setting names another).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars on stderr [default: on a terminal].")
@json_option
def models_fetch(models_dir: Path | None, base_url: str | None, no_encodec: bool, only_encodec: bool,
                 whisper: bool, whisper_size: str, progress: bool | None) -> None:
    """Download the VALL-E X checkpoint, the Vocos vocoder and EnCodec; verify their sha256.

    Interrupted downloads resume (HTTP Range). A digest is recorded in
    manifest.json at the first download and checked on every later run
    (Whisper's published sha256 is checked from the first).
    """
    models_dir = models_dir or default_models_dir()
    show = (stderr_is_tty() if progress is None else progress) and not state().json
    files = None
    if only_encodec or whisper:
        if no_encodec and only_encodec:
            raise click.UsageError("--encodec and --no-encodec contradict each other")
        files = [mdl.ENCODEC] if only_encodec else []
        files += [mdl.whisper_file(whisper_size)] if whisper else []
    reports = mdl.fetch_models(models_dir, base_url=mdl.base_url_from(base_url),
                               include_optional=not no_encodec, progress_for=_progress_for(show),
                               hash_progress_for=_hash_progress_for(show), files=files)

    def human() -> None:
        for r in reports:
            extra = " (resumed)" if r.resumed else ""
            click.echo(f"{r.status:10} {r.relpath:40} {format_size(r.size or 0):>10}  {r.sha256}{extra}")
        click.echo(f"models are in {models_dir}")

    emit({"dir": str(models_dir), "files": [r.to_json() for r in reports]}, human)


@models.command("verify")
@dir_option
@json_option
def models_verify(models_dir: Path | None) -> None:
    """Check the model files against the recorded digests (changes nothing)."""
    models_dir = models_dir or default_models_dir()
    reports = mdl.verify_models(models_dir, hash_progress_for=_hash_progress_for(
        stderr_is_tty() and not state().json))
    bad = [r for r in reports if r.status == "mismatch"]
    missing = [r for r in reports if r.status == "missing" and r.detail != "optional"]

    def human() -> None:
        for r in reports:
            click.echo(f"{r.status:9} {r.relpath:40} {r.sha256 or '':64}  {r.detail}".rstrip())

    ok = not bad and not missing
    report = {"dir": str(models_dir), "ok": ok, "files": [r.to_json() for r in reports]}
    if ok or not state().json:  # with --json a failure is one error document carrying the report
        emit(report, human)
    if bad:
        raise VallexError(f"{len(bad)} model file(s) do not match their recorded digest in {models_dir}: "
                          "delete them and run `vallexctl models fetch`", reason="DIGEST_MISMATCH",
                          details=report)
    if missing:
        raise NotFound(f"missing in {models_dir}: {', '.join(r.relpath for r in missing)}; "
                       "run `vallexctl models fetch`", reason="MODELS_MISSING", details=report)


# --------------------------------------------------------------------------- daemon


@dataclass(frozen=True)
class Started:
    pid: int
    reused: bool
    log: Path | None


def pid_file(socket_path: Path) -> Path:
    return socket_path.parent / "vallexd.pid"


def default_log_file() -> Path:
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "vallexd" / "vallexd.log"


def start_daemon(socket_path: Path, *, checkpoint: Path | None, vocos_dir: Path | None,
                 log_file: Path, timeout: float = READY_TIMEOUT_S) -> Started:
    """Reuse a daemon that answers at `socket_path`, or start one detached and wait for `ping`."""
    answer = ping(socket_path)
    if answer is not None:
        return Started(pid=-1, reused=True, log=None)
    args = [sys.executable, "-m", "vallexd", "--socket", str(socket_path)]
    if checkpoint is not None:
        args += ["--checkpoint", str(checkpoint)]
    if vocos_dir is not None:
        args += ["--vocos", str(vocos_dir)]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with log_file.open("ab") as log:
        # start_new_session: the daemon leaves our process group, so Ctrl-C here or closing the
        # terminal does not take it down; stdin from /dev/null so it never waits on a tty.
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True, cwd="/")
    _write_pid(pid_file(socket_path), proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file(socket_path).unlink(missing_ok=True)
            tail = _tail(log_file)
            raise Unavailable(f"vallexd exited with status {proc.returncode} while starting; "
                              f"last log line: {tail!r} (full log: {log_file})", reason="DAEMON_START_FAILED")
        if ping(socket_path, timeout=1.0) is not None:
            return Started(pid=proc.pid, reused=False, log=log_file)
        time.sleep(0.1)
    raise Unavailable(f"vallexd did not answer within {timeout:.0f} s; see {log_file}",
                      reason="DAEMON_START_TIMEOUT")


def stop_daemon(socket_path: Path, timeout: float = 30.0) -> int:
    """SIGTERM the daemon recorded in the pid file; wait for it to exit. Returns its pid."""
    path = pid_file(socket_path)
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        raise NotFound(f"no pid file at {path}: this daemon was not started by vallexctl "
                       "(stop it with `systemctl stop vallexd` or where you started it)",
                       reason="NO_PID_FILE") from None
    if not _is_vallexd(pid, socket_path):
        path.unlink(missing_ok=True)
        raise NotFound(f"pid {pid} from {path} is not a running vallexd (stale pid file removed)",
                       reason="STALE_PID_FILE")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    # Identity was checked above; now wait for the process itself to go (an exiting process
    # loses its cmdline before it is gone, so that check would end the wait too early).
    while _alive(pid):
        if time.monotonic() > deadline:
            raise VallexError(f"vallexd (pid {pid}) did not exit within {timeout:.0f} s of SIGTERM",
                              reason="STOP_TIMEOUT")
        time.sleep(0.05)
    path.unlink(missing_ok=True)
    return pid


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be our child
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _is_vallexd(pid: int, socket_path: Path) -> bool:
    """Alive and really our vallexd: pids get reused, so a stale pid file may name another program.

    `start_daemon` passes `--socket PATH` on the command line, so both must be there.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return _alive(pid) and b"vallexd" in argv and os.fsencode(str(socket_path)) in argv


def _write_pid(path: Path, pid: int) -> None:
    from vallexctl.output import write_file_atomic

    write_file_atomic(path, f"{pid}\n".encode())


def _tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


@click.group()
def daemon() -> None:
    """Start or stop a vallexd in the background (without systemd)."""


log_option = click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                          help="Where the daemon logs [default: $XDG_STATE_HOME/vallexd/vallexd.log].")


@daemon.command("start")
@dir_option
@log_option
@json_option
def daemon_start(models_dir: Path | None, log_file: Path | None) -> None:
    """Start vallexd in the background with the models in DIR (or reuse a running one)."""
    models_dir = models_dir or default_models_dir()
    started = _start_with(models_dir, log_file)
    _report_started(started)


@daemon.command("stop")
@json_option
def daemon_stop() -> None:
    """SIGTERM the daemon `daemon start`/`quickstart` started, and wait for it to exit."""
    pid = stop_daemon(state().socket_path)
    emit({"stopped": True, "pid": pid}, f"stopped vallexd (pid {pid})")


def _start_with(models_dir: Path, log_file: Path | None) -> Started:
    return start_daemon(state().socket_path, checkpoint=models_dir / mdl.MODEL_FILES[0].relpath,
                        vocos_dir=models_dir / "vocos-encodec-24khz", log_file=log_file or default_log_file())


def _report_started(started: Started) -> None:
    sock = state().socket_path
    data = {"pid": started.pid, "reused": started.reused, "socket": str(sock),
            "log": str(started.log) if started.log else None}
    if started.reused:
        emit(data, f"vallexd is already running at {sock}")
    else:
        emit(data, f"started vallexd (pid {started.pid}) at {sock}; log: {started.log}")


# --------------------------------------------------------------------------- quickstart


@click.command()
@click.option("--demo", is_flag=True, help="Use tiny random weights (no download). The audio is NOISE.")
@dir_option
@click.option("--base-url", envvar=mdl.BASE_URL_ENV, metavar="URL", help="Models mirror (see models fetch).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("vallexd-quickstart.wav"), show_default=True, help="Where to write the sentence.")
@click.option("--text", default=QUICKSTART_TEXT, help="What to say.")
@log_option
@json_option
def quickstart(demo: bool, models_dir: Path | None, base_url: str | None, output: Path, text: str,
               log_file: Path | None) -> None:
    """From nothing to a spoken sentence: fetch models, start vallexd, speak one sentence to a WAV."""
    st = state()
    show = stderr_is_tty() and not st.json
    models_dir = models_dir or default_models_dir()
    if demo:
        models_dir = models_dir.parent / "tiny-demo"
        if not mdl.models_present(models_dir):
            note(f"making tiny random demo weights in {models_dir} (the audio will be noise) ...")
            from vallexd.tools.tiny_weights import make_tiny  # torch: only here

            make_tiny(models_dir)
    elif not mdl.models_present(models_dir):
        note(f"fetching the VALL-E X models into {models_dir} (about 1.6 GB) ...")
        try:
            mdl.fetch_models(models_dir, base_url=mdl.base_url_from(base_url), include_optional=False,
                             progress_for=_progress_for(show))
        except (DownloadFailed, NotFound) as exc:
            raise Unavailable(
                f"could not fetch the model weights ({exc.message}); download them by hand into "
                f"{models_dir} (see `vallexctl models fetch --help` for the files and URLs, or use "
                f"--base-url with a mirror), or try everything offline with `vallexctl quickstart --demo` "
                "(tiny random weights: the audio is noise)",
                reason="MODELS_UNAVAILABLE",
            ) from None

    started = _start_with(models_dir, log_file)
    if not st.json:
        note(f"vallexd is {'already running' if started.reused else f'running (pid {started.pid})'} "
             f"at {st.socket_path}")
    from vallexctl.output import write_file_atomic

    with state().client() as c:
        result = c.call("synthesize", {"text": text, "language": "en", "return": "audio"})
    audio = result.pop("audio")
    write_file_atomic(output, bytes(audio))
    data = {"output": str(output.resolve()), "demo": demo, "daemon_pid": started.pid,
            "daemon_reused": started.reused, "duration_s": result.get("duration_s"),
            "models_dir": str(models_dir)}
    lines = [str(output.resolve())]
    if demo:
        lines.append("(demo weights are random: this WAV is noise; "
                     "run `vallexctl quickstart` online for speech)")
    lines.append("next: vallexctl speak -o out.wav \"your text\"; vallexctl presets list --available")
    emit(data, "\n".join(lines))


def register(cli: click.Group) -> None:
    cli.add_command(models)
    cli.add_command(daemon)
    cli.add_command(quickstart)
