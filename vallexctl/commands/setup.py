"""Setting up: `models fetch|verify`, `daemon start|stop`, and `quickstart` (nothing → a spoken sentence)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from vallexctl import model_files as mdl
from vallexctl.background import Started, default_log_file, start_daemon, stop_daemon
from vallexctl.client import ping
from vallexctl.context import state
from vallexctl.download import DownloadFailed
from vallexctl.output import EXIT_INTERRUPTED, ProgressLine, emit, json_option, note, stderr_is_tty
from vallexctl.units import format_size
from vallexd.constants import WHISPER_DEFAULT_SIZE
from vallexd.errors import NotFound, Unavailable, VallexError

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


@contextmanager
def resumable(command: str) -> Iterator[None]:
    """Ctrl-C during a download: one line saying that running `command` again resumes (exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo(f"vallexctl: interrupted; run `{command}` again to resume the download "
                   "(the part files are kept)", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@models.command("fetch", epilog=mdl.files_help())
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

    Interrupted downloads resume (HTTP Range): run the same command again. A digest is
    recorded in manifest.json at the first download and checked on every later run
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
    with resumable("vallexctl models fetch"):
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
    if mdl.is_demo(models_dir):
        emit({"dir": str(models_dir), "ok": True, "demo": True, "files": []},
             f"{models_dir} holds the demo weights (tiny, random: made by `vallexctl quickstart --demo`); "
             "they have no published digests, so there is nothing to verify; `vallexctl models fetch` "
             "gets the real ones")
        return
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
                       f"run `vallexctl models fetch`{_demo_hint(models_dir)}", reason="MODELS_MISSING",
                       details=report)


def _demo_hint(models_dir: Path) -> str:
    demo = mdl.demo_dir(models_dir)
    if not mdl.is_demo(demo):
        return ""
    return f" (the demo weights in {demo} are random and start with `vallexctl daemon start --demo`)"


# --------------------------------------------------------------------------- daemon


@click.group()
def daemon() -> None:
    """Start or stop a vallexd in the background (without systemd)."""


log_option = click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                          help="Where the daemon logs [default: $XDG_STATE_HOME/vallexd/vallexd.log].")
demo_option = click.option("--demo", is_flag=True,
                           help="Use the demo weights (tiny, random: the audio is NOISE) of "
                                "`quickstart --demo`.")
daemon_args_argument = click.argument("daemon_args", nargs=-1, type=click.UNPROCESSED,
                                      metavar="[-- VALLEXD_OPTIONS]")

DAEMON_ARGS_HELP = """\b
Options after `--` go to vallexd itself (see `vallexd --help`), e.g.
  vallexctl daemon start -- --threads 1 --static-port 0 --http-port 8081
VALLEXD_* environment variables and a VALLEXD_CONFIG file work too.
"""


@daemon.command("start", epilog=DAEMON_ARGS_HELP)
@dir_option
@demo_option
@log_option
@daemon_args_argument
@json_option
def daemon_start(models_dir: Path | None, demo: bool, log_file: Path | None,
                 daemon_args: tuple[str, ...]) -> None:
    """Start vallexd in the background with the models in DIR (or reuse a running one)."""
    models_dir = _weights_dir(models_dir, demo)
    own_checkpoint = "--checkpoint" in daemon_args
    if ping(state().socket_path) is None:
        _check_weights(models_dir, daemon_args)
    # A running daemon with other weights is replaced only when these weights are there to use.
    replace = mdl.models_present(models_dir) and not own_checkpoint
    _report_started(_start_with(models_dir, log_file, daemon_args, replace=replace))


@daemon.command("stop")
@json_option
def daemon_stop() -> None:
    """SIGTERM the daemon `daemon start`/`quickstart` started, and wait for it to exit.

    Nothing running is not an error: it says so and exits 0.
    """
    sock = state().socket_path
    pid = stop_daemon(sock)
    if pid is None:
        emit({"stopped": False, "running": False, "pid": None},
             f"vallexd is not running (no daemon at {sock})")
    else:
        emit({"stopped": True, "running": False, "pid": pid}, f"stopped vallexd (pid {pid})")


def _weights_dir(models_dir: Path | None, demo: bool) -> Path:
    models_dir = models_dir or default_models_dir()
    return mdl.demo_dir(models_dir) if demo else models_dir


def _check_weights(models_dir: Path, daemon_args: tuple[str, ...]) -> None:
    """Missing weights: say where, and what gets them (demo weights included), before starting anything."""
    if mdl.models_present(models_dir) or "--checkpoint" in daemon_args:
        return
    if mdl.is_demo(mdl.demo_dir(models_dir)):
        advice = (f"fetch them with `vallexctl models fetch`, or start the demo weights in "
                  f"{mdl.demo_dir(models_dir)} with `vallexctl daemon start --demo` "
                  "(random: the audio is noise)")
    else:
        advice = ("fetch them with `vallexctl models fetch` (or try tiny random weights with "
                  "`vallexctl quickstart --demo`)")
    raise NotFound(f"no model weights in {models_dir}: {advice}", reason="MODELS_MISSING")


def _start_with(models_dir: Path, log_file: Path | None, daemon_args: tuple[str, ...] = (), *,
                replace: bool = True) -> Started:
    if any(arg == "--socket" or arg.startswith("--socket=") for arg in daemon_args):
        raise click.UsageError("give the socket as `vallexctl --socket PATH daemon start`, not after --")
    # Notes go to stderr, so they are given with --json too (stdout stays one JSON document).
    return start_daemon(state().socket_path, checkpoint=models_dir / mdl.MODEL_FILES[0].relpath,
                        vocos_dir=models_dir / "vocos-encodec-24khz", log_file=log_file or default_log_file(),
                        extra_args=daemon_args, replace=replace, note=note)


def _report_started(started: Started) -> None:
    sock = state().socket_path
    demo = started.checkpoint is not None and mdl.is_demo(started.checkpoint.parent)
    data = {"pid": started.pid, "reused": started.reused, "socket": str(sock), "demo": demo,
            "checkpoint": str(started.checkpoint) if started.checkpoint else None,
            "log": str(started.log) if started.log else None}
    weights = " with the demo weights (the audio is noise)" if demo else ""
    if started.reused:
        emit(data, f"vallexd is already running (pid {started.pid}) at {sock}{weights}")
    else:
        emit(data, f"started vallexd (pid {started.pid}) at {sock}{weights}; log: {started.log}")


# --------------------------------------------------------------------------- quickstart


@click.command(epilog=DAEMON_ARGS_HELP)
@click.option("--demo", is_flag=True, help="Use tiny random weights (no download). The audio is NOISE.")
@dir_option
@click.option("--base-url", envvar=mdl.BASE_URL_ENV, metavar="URL", help="Models mirror (see models fetch).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("vallexd-quickstart.wav"), show_default=True, help="Where to write the sentence.")
@click.option("--text", default=QUICKSTART_TEXT, help="What to say.")
@log_option
@daemon_args_argument
@json_option
def quickstart(demo: bool, models_dir: Path | None, base_url: str | None, output: Path, text: str,
               log_file: Path | None, daemon_args: tuple[str, ...]) -> None:
    """From nothing to a spoken sentence: fetch models, start vallexd, speak one sentence to a WAV.

    A vallexd that vallexctl started with other weights (the demo's, say) is restarted with these.
    """
    from vallexctl.commands.speak import call_when_ready
    from vallexctl.output import check_writable_dir, write_file_atomic

    st = state()
    check_writable_dir(output)
    models_dir = _weights_dir(models_dir, demo)
    if demo:
        _ensure_demo(models_dir)
    elif not mdl.models_present(models_dir):
        _fetch_for_quickstart(models_dir, base_url)

    started = _start_with(models_dir, log_file, daemon_args)
    with st.client() as c:
        result = call_when_ready(c, "synthesize", {"text": text, "language": "en", "return": "audio"})
    write_file_atomic(output, bytes(result.pop("audio")))
    spoke_demo = started.checkpoint is not None and mdl.is_demo(started.checkpoint.parent)
    data = {"output": str(output.resolve()), "demo": spoke_demo, "daemon_pid": started.pid,
            "daemon_reused": started.reused, "duration_s": result.get("duration_s"),
            "models_dir": str(started.checkpoint.parent if started.checkpoint else models_dir)}
    if not st.json:
        note(f"vallexd is {'already running' if started.reused else 'running'} (pid {started.pid}) "
             f"at {st.socket_path}")
    lines = [str(output.resolve())]
    if spoke_demo:
        lines.append("(demo weights are random: this WAV is noise; "
                     "run `vallexctl quickstart` online for speech)")
    lines.append("next: vallexctl speak -o out.wav \"your text\"; vallexctl presets list --available")
    emit(data, "\n".join(lines))


def _ensure_demo(folder: Path) -> None:
    if mdl.models_present(folder):
        if not mdl.is_demo(folder):  # made by an older vallexctl: mark it
            from vallexd.storage import fsutil

            fsutil.atomic_write(folder / mdl.DEMO_MARKER, b"tiny random demo weights\n", mode=None)
        return
    note(f"making tiny random demo weights in {folder} (the audio will be noise) ...")
    mdl.make_demo(folder)


def _fetch_for_quickstart(models_dir: Path, base_url: str | None) -> None:
    note(f"fetching the VALL-E X models into {models_dir} (about 1.6 GB) ...")
    show = stderr_is_tty() and not state().json
    try:
        with resumable("vallexctl quickstart"):
            mdl.fetch_models(models_dir, base_url=mdl.base_url_from(base_url), include_optional=False,
                             progress_for=_progress_for(show))
    except (DownloadFailed, NotFound) as exc:
        raise Unavailable(
            f"could not fetch the model weights ({exc.message}); download them by hand into "
            f"{models_dir} (`vallexctl models fetch --help` lists the files and URLs, or use "
            f"--base-url with a mirror), or try everything offline with `vallexctl quickstart --demo` "
            "(tiny random weights: the audio is noise)",
            reason="MODELS_UNAVAILABLE",
        ) from None


def register(cli: click.Group) -> None:
    cli.add_command(models)
    cli.add_command(daemon)
    cli.add_command(quickstart)
