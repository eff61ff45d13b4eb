"""vallexctl: talk to a running vallexd, manage voices, the cache and the model files.

The group, its global options and the small daemon commands live here; the
bigger commands are in `commands/`.  Nothing heavy is imported at module
level (no torch, engine or text front end): `vallexctl status` must start in
a blink.  Every error is one line on stderr and a documented exit code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from vallexctl.commands import presets as commands_presets
from vallexctl.commands import setup as commands_setup
from vallexctl.commands import speak as commands_speak
from vallexctl.context import State, default_socket, state
from vallexctl.output import (
    EXIT_INTERRUPTED,
    EXIT_OTHER,
    EXIT_PIPE_CLOSED,
    EXIT_USAGE,
    emit,
    error_line,
    exit_code_for,
    json_option,
)
from vallexctl.units import format_duration, format_size, parse_duration, parse_size
from vallexd import __version__
from vallexd.errors import InvalidArgument, VallexError

EPILOG = """\b
Exit codes: 0 ok (or nothing to do), 1 other failure, 2 usage or configuration
(bad option, argument or daemon setting), 3 daemon unreachable, 4 not found
(voice, preset, file, model files, a URL), 5 retry later (queue full, model
still loading), 130 interrupted, 141 stdout closed early.
Errors are one line on stderr; --json puts machine-readable results on stdout.
"""


class _PipeClosed(Exception):
    """stdout's reader went away; not an OSError, so click's own EPIPE handling (exit 1) stays out."""


class VallexGroup(click.Group):
    """Turns every VallexError into one stderr line and its exit code (CliRunner sees it too)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Click's main, but every way out is ONE stderr line and a documented exit code.

        Usage errors (exit 2) become `vallexctl CMD: problem (see `vallexctl CMD --help`)` instead of
        click's four lines; Ctrl-C is `interrupted` (130); a reader that went away (`| head`) ends
        the program quietly with 141, as a Unix tool killed by SIGPIPE would.
        """
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
            try:
                sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            except BrokenPipeError:
                raise _PipeClosed() from None
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx is not None else "vallexctl"
            message = " ".join(exc.format_message().split())
            click.echo(f"{path}: {message} (see `{path} --help`)", err=True)
            code = EXIT_USAGE
        except click.ClickException as exc:
            click.echo(f"vallexctl: {' '.join(exc.format_message().split())}", err=True)
            code = exc.exit_code
        except (click.Abort, KeyboardInterrupt, EOFError):
            click.echo("vallexctl: interrupted", err=True)
            code = EXIT_INTERRUPTED
        except _PipeClosed:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # nothing more can reach the reader, not even a flush
            code = EXIT_PIPE_CLOSED
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise _PipeClosed() from None  # the reader went away: main() ends quietly
        except VallexError as exc:
            obj = ctx.find_object(State)
            if obj is not None and obj.json:
                import json

                click.echo(json.dumps({"ok": False, "error": exc.to_wire()}, ensure_ascii=False))
            click.echo(error_line(exc), err=True)
            ctx.exit(exit_code_for(exc))
        except OSError as exc:  # a local file we could not read or write
            where = f" {exc.filename}" if exc.filename else ""
            click.echo(f"vallexctl:{where}: {exc.strerror or exc}", err=True)
            ctx.exit(EXIT_OTHER)


@click.group(cls=VallexGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", envvar="VALLEXD_SOCKET", type=click.Path(path_type=Path),
              help="The daemon's Unix socket [env VALLEXD_SOCKET; default: $XDG_RUNTIME_DIR/vallexd/"
                   "vallexd.sock (/tmp/vallexd-UID/vallexd.sock without XDG_RUNTIME_DIR), or "
                   "/run/vallexd/vallexd.sock when only the system service runs].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds to wait for an answer (default: as long as the daemon works).")
@json_option
@click.version_option(__version__, prog_name="vallexctl")
@click.pass_context
def cli(ctx: click.Context, socket_path: Path | None, timeout: float | None) -> None:
    """Speak text with the local vallexd daemon and manage its voices, cache and models.

    \b
    Quick start:  vallexctl quickstart          (fetch models, start vallexd, speak)
    Speak:        vallexctl speak -v paimon -o hi.wav "Hello there"
    Voices:       vallexctl presets list; vallexctl preset install NAME|FILE.npz|URL
    """
    ctx.obj = State(socket_path=socket_path or default_socket(), timeout=timeout,
                    json=bool(ctx.meta.get("vallexctl.json")))


# --------------------------------------------------------------------------- status


@cli.command()
@json_option
def status() -> None:
    """Show the daemon's state: model, device, queue, cache, presets."""
    with state().client() as c:
        result = c.call("status")

    def human() -> None:
        cache = result.get("cache") or {}
        rows = [
            ("version", result.get("version")),
            ("pid", result.get("pid")),
            ("uptime", format_duration(float(result.get("uptime_s") or 0))),
            ("model", _model_state(result)),
            ("model identity", result.get("model_identity")),
            ("device", f"{result.get('device')} ({result.get('dtype')})"),
            *_gpu_rows(result.get("device_info")),
            ("queue", f"{result.get('queue_depth')} waiting, {result.get('in_flight')} running, "
                      f"limit {result.get('queue_limit')}"),
            ("batching", _batching(result)),
            ("cache", f"{cache.get('files', 0)} files, {format_size(int(cache.get('bytes') or 0))}"),
            ("presets", result.get("presets")),
            ("static url", result.get("static_url") or "off"),
            ("http url", result.get("http_url") or "off"),
            ("socket", state().socket_path),
            *_metrics_rows(result),
        ]
        for key, value in rows:
            click.echo(f"{key + ':':16}{value}")

    emit(result, human)


def _batching(status: dict[str, Any]) -> str:
    """AR rows now and at most, torch threads, and where the NAR runs (--nar-thread)."""
    nar = status.get("nar_thread")
    where = "its own thread" if nar else "the model thread" if nar is False else "- (model not loaded)"
    return (f"{status.get('batch_size', 0)} of {status.get('max_batch')} rows, {status.get('threads')} "
            f"threads, NAR on {where}")


def _model_state(status: dict[str, Any]) -> str:
    """"loading" while the daemon loads its model (it already answers), "loaded", or "shutting down"."""
    state_ = status.get("state")
    if state_ == "loading":
        return "loading (speak waits for it)"
    if state_ == "draining":
        return "shutting down"
    return "loaded" if status.get("model_loaded") else "not loaded"


def _gpu_rows(info: object) -> list[tuple[str, str]]:
    """status rows for a CUDA device: its name, capability, memory in use, driver."""
    if not isinstance(info, dict) or info.get("type") != "cuda":
        return []
    used = format_size(int(info.get("memory_reserved_bytes") or 0))
    total = format_size(int(info.get("memory_total_bytes") or 0))
    return [
        ("gpu", f"{info.get('name')} (capability {info.get('capability')})"),
        ("gpu memory", f"{used} reserved of {total}"),
        ("gpu driver", f"{info.get('driver')} (CUDA {info.get('driver_cuda')}; torch CUDA "
                       f"{info.get('cuda_runtime')})"),
    ]


def _metrics_rows(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """The main figures of the daemon's metrics (the full set is at GET /metrics)."""
    m = result.get("metrics")
    if not isinstance(m, dict):
        return []
    counters = result.get("counters") or {}
    hits, misses = int(counters.get("cache_hits") or 0), int(counters.get("cache_misses") or 0)
    requests = m.get("requests") or {}

    def seconds(value: Any) -> str:
        return "-" if value is None else f"{float(value):.2f} s"

    by_transport = ", ".join(f"{k} {v}" for k, v in sorted(requests.items())) or "0"
    ratio = f" ({hits / (hits + misses):.0%})" if hits + misses else ""
    return [
        ("requests", f"{by_transport} ({m.get('errors', 0)} errors)"),
        ("cache hits", f"{hits} of {hits + misses}{ratio}, {counters.get('coalesced', 0)} shared a run"),
        ("first audio", f"{seconds(m.get('time_to_first_audio_s'))} mean; synthesis "
                        f"{seconds(m.get('synthesis_s'))} mean"),
        ("real time", "-" if m.get("real_time_factor") is None else f"{m['real_time_factor']:.2f}x "
                      "(work per second of audio)"),
        ("AR steps", f"{m.get('ar_steps', 0)} ({m.get('ar_steps_per_busy_s') or '-'}/s busy, "
                     f"mean batch {m.get('mean_batch_size') or '-'})"),
        ("model load", seconds(m.get("model_load_s"))),
    ]


# --------------------------------------------------------------------------- cache


@cli.group()
def cache() -> None:
    """Inspect and prune the daemon's cache of spoken WAVs."""


@cache.command("stats")
@json_option
def cache_stats() -> None:
    """Files and bytes in the cache."""
    with state().client() as c:
        result = c.call("cache.stats")
    emit(result, f"{result.get('files', 0)} files, {format_size(int(result.get('bytes') or 0))} "
                 f"in {result.get('dir')}")


@cache.command("prune")
@click.option("--older-than", metavar="AGE", help="Remove files not used for AGE (e.g. 7d, 12h, 30m).")
@click.option("--max-size", metavar="SIZE", help="Then remove the oldest until the cache is at most SIZE "
                                                  "(e.g. 500M, 2G).")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@json_option
def cache_prune(older_than: str | None, max_size: str | None, dry_run: bool) -> None:
    """Remove old cached WAVs; report the files and bytes freed."""
    params: dict[str, Any] = {"dry_run": dry_run}
    try:
        if older_than is not None:
            params["max_age_s"] = parse_duration(older_than)
        if max_size is not None:
            params["max_bytes"] = parse_size(max_size)
    except InvalidArgument as exc:
        raise click.UsageError(exc.message) from None
    if older_than is None and max_size is None:
        raise click.UsageError("say what to prune: --older-than AGE and/or --max-size SIZE")
    with state().client() as c:
        result = c.call("cache.prune", params)
    verb = "would remove" if result.get("dry_run") else "removed"
    freed = format_size(int(result.get("freed_bytes") or 0))
    left = format_size(int(result.get("remaining_bytes") or 0))
    emit(result, f"{verb} {result.get('removed', 0)} files, {freed}; "
                 f"{result.get('remaining_files', 0)} files, {left} remain")


def main(argv: list[str] | None = None) -> None:
    """Console script entry point (exit codes: see EPILOG and the README)."""
    cli.main(args=argv, prog_name="vallexctl")


# The command modules add their commands to the group.
commands_speak.register(cli)
commands_presets.register(cli)
commands_setup.register(cli)


if __name__ == "__main__":
    main()
