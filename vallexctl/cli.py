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
    EXIT_OTHER,
    emit,
    error_line,
    exit_code_for,
    json_option,
)
from vallexctl.units import format_duration, format_size, parse_duration, parse_size
from vallexd import __version__
from vallexd.errors import InvalidArgument, VallexError

EPILOG = """\b
Exit codes: 0 ok, 1 other failure, 2 usage (bad option or argument),
3 daemon unreachable, 4 not found (voice, preset, file), 5 busy (queue full).
Errors are one line on stderr; --json puts machine-readable results on stdout.
"""


class VallexGroup(click.Group):
    """Turns every VallexError into one stderr line and its exit code (CliRunner sees it too)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
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
                   "vallexd.sock, or /run/vallexd/vallexd.sock when only the system service runs].")
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
            ("model", "loaded" if result.get("model_loaded") else "not loaded"),
            ("model identity", result.get("model_identity")),
            ("device", f"{result.get('device')} ({result.get('dtype')})"),
            ("queue", f"{result.get('queue_depth')} waiting, {result.get('in_flight')} running, "
                      f"limit {result.get('queue_limit')}"),
            ("cache", f"{cache.get('files', 0)} files, {format_size(int(cache.get('bytes') or 0))}"),
            ("presets", result.get("presets")),
            ("static url", result.get("static_url")),
            ("http url", result.get("http_url") or "off"),
            ("socket", state().socket_path),
            *_metrics_rows(result),
        ]
        for key, value in rows:
            click.echo(f"{key + ':':16}{value}")

    emit(result, human)


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
    """Console script entry point."""
    # Make `vallexctl speak ... | head` not print a traceback when the reader goes away.
    try:
        cli.main(args=argv, prog_name="vallexctl")
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_OTHER)


# The command modules add their commands to the group.
commands_speak.register(cli)
commands_presets.register(cli)
commands_setup.register(cli)
