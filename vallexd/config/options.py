"""The daemon's configuration: one frozen `Config`, built once at start.

Sources, lowest priority first: built-in defaults < TOML file (`--config PATH`
or `VALLEXD_CONFIG`) < `VALLEXD_*` environment variables < command-line flags.
Every option has one *key*; the same key names it in all three places:

    key "http_port"  ->  TOML `http_port = 8081`, env `VALLEXD_HTTP_PORT=8081`, flag `--http-port 8081`

Torch-free on purpose: the client imports `default_paths` to find the socket.
A bad value raises `ConfigError` naming the source (flag / environment / file)
and the key, so a typo in a unit file is easy to find in the journal.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vallexd.config.paths import default_paths
from vallexd.config.settings import DEFAULT_VOICE_ALIASES, Config, ConfigError
from vallexd.constants import NAR_THREAD_MODES, QUANTIZE_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "VALLEXD_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# "auto", "cpu", "mps", "cuda" or "cuda:N": what Engine.load understands.
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")


# --------------------------------------------------------------------------- value parsers
# Each parser takes the raw value (str from env/flags, any TOML type from the file)
# and returns the typed value or raises ValueError with a human explanation.


def _to_int(value: Any) -> int:
    if isinstance(value, bool):  # TOML true is not 1
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {value!r}")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    else:
        raise ValueError(f"expected a number, got {value!r}")
    if result != result or result in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {value!r}")
    return result


def _above(parse: Callable[[Any], Any], low: int, *, inclusive: bool) -> Callable[[Any], Any]:
    """A parser that also requires value >= low (inclusive) or > low."""

    def parse_bounded(value: Any) -> Any:
        x = parse(value)
        if x < low or (x == low and not inclusive):
            raise ValueError(f"must be {'>=' if inclusive else '>'} {low}, got {x:g}")
        return x

    return parse_bounded


_non_negative_int = _above(_to_int, 0, inclusive=True)
_positive_int = _above(_to_int, 0, inclusive=False)
_positive_float = _above(_to_float, 0, inclusive=False)
_non_negative_float = _above(_to_float, 0, inclusive=True)


def _port(value: Any) -> int:
    n = _to_int(value)
    if not 0 <= n <= 65535:
        raise ValueError(f"port must be 0..65535, got {n}")
    return n


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """'' / 'off' / 'none' (any case) mean None, so env and TOML can switch an option off."""

    def parse_optional(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
            return None
        return parse(value)

    return parse_optional


def _mode(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an octal mode such as 660, got {value!r}")
    if isinstance(value, int):  # TOML: write it as 0o660
        n = value
    elif isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", text):
            raise ValueError(f"expected an octal mode such as 660 or 0o660, got {value!r}")
        n = int(text, 8)
    else:
        raise ValueError(f"expected an octal mode, got {value!r}")
    if not 0 <= n <= 0o777:
        raise ValueError(f"mode must be within 0o000..0o777, got {oct(n)}")
    return n


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    if "\0" in value:
        raise ValueError("must not contain NUL characters")
    return value.strip()


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _device(value: Any) -> str:
    text = _string(value).lower()
    if not _DEVICE_RE.match(text):
        raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda, cuda:N or mps")
    return text


def _one_of(what: str, choices: Sequence[str],
            case: Callable[[str], str] = str.lower) -> Callable[[Any], str]:
    """A parser for a choice: `value` with `case` applied must be one of `choices`."""

    def parse(value: Any) -> str:
        text = case(_string(value))
        if text not in choices:
            raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
        return text

    return parse


_dtype = _one_of("dtype", DTYPES)
_quantize = _one_of("quantize mode", QUANTIZE_MODES)
_nar_thread = _one_of("nar_thread mode", NAR_THREAD_MODES)
_log_level = _one_of("log level", LOG_LEVELS, str.upper)


def _str_list(value: Any, sep: str = ",") -> tuple[str, ...]:
    if isinstance(value, str):
        items = [part for part in value.split(sep) if part.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(_string(item) for item in items)


def _aliases(value: Any) -> dict[str, str]:
    """NAME=PRESET pairs: a TOML table, or "a=b,c=d" from the environment or repeated flags."""
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        items = value if isinstance(value, list) else _str_list(value)
        pairs = []
        for item in items:
            name, sep, preset = _string(item).partition("=")
            if not sep:
                raise ValueError(f"expected NAME=PRESET, got {item!r}")
            pairs.append((name.strip(), preset.strip()))
    from vallexd.service.requests import is_valid_name

    result = {}
    for name, preset in pairs:
        if not isinstance(name, str) or not name or not isinstance(preset, str) or not is_valid_name(preset):
            raise ValueError(f"bad alias {name!r} = {preset!r}: the preset must be a valid preset name")
        result[name] = preset
    return result


# --------------------------------------------------------------------------- option table


@dataclass(frozen=True)
class Option:
    key: str  # TOML key; env VALLEXD_<KEY>; flag --<key with dashes> unless `flag` says otherwise
    field: str  # Config field it sets
    parse: Callable[[Any], Any]
    help: str
    # "value", "path", "paths" (repeatable flag), "list" (repeatable), "off" (--no-x), "on" (--x)
    kind: str = "value"
    flag: str | None = None
    metavar: str | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("socket", "socket_path", _string, "Unix socket to listen on", "path", metavar="PATH"),
    Option("socket_mode", "socket_mode", _mode, "permissions of the socket file, octal (default 660)",
           metavar="MODE"),
    Option("socket_group", "socket_group", _optional(_string),
           "group that owns the socket, so its members may connect", metavar="GROUP"),
    Option("checkpoint", "checkpoint", _string, "VALL-E X checkpoint file (vallex-checkpoint.pt)", "path",
           metavar="FILE"),
    Option("vocos", "vocos_dir", _string, "local folder of the Vocos EnCodec-24kHz vocoder", "path",
           metavar="DIR"),
    Option("presets_dir", "presets_dirs", _string,
           "folder of voice presets (*.npz); repeat for several (replaces the default); the FIRST is where "
           "presets.install writes, the others are read-only (env: separate with ':'; TOML: a list)",
           "paths", metavar="DIR"),
    Option("cache_dir", "cache_dir", _string, "folder of cached WAV results", "path", metavar="DIR"),
    Option("device", "device", _device, "torch device: auto, cpu, cuda, cuda:N or mps", metavar="DEV"),
    Option("dtype", "dtype", _dtype, "model precision: auto, float32, float16 or bfloat16", metavar="DTYPE"),
    Option("quantize", "quantize", _quantize,
           "int8 weight matmuls on CPUs with VNNI: none, nar (the NAR decoder) or all (both decoders); "
           "faster, with drift against float32 close to bfloat16's (README: Configuration reference)",
           metavar="MODE"),
    Option("threads", "threads", _non_negative_int,
           "CPU threads for the model; 0 = torch's default (one per core). On a busy or shared machine "
           "1 is often faster: see bench/bench_model.py --threads", metavar="N"),
    Option("max_batch", "max_batch", _positive_int,
           "most AR rows decoded together (concurrent requests and fixed-mode pieces share steps); each "
           "row's float32 k/v cache takes n_layers x 2 x d_model x 4 bytes per position (96 KiB for the "
           "full model: ~55-180 MB for a typical row)", metavar="N"),
    Option("nar_thread", "nar_thread", _nar_thread,
           "run the NAR stages and the vocoder of finished rows on a second thread while the AR batch "
           "steps, the CPU cores shared between them: auto (on for an eager CPU model with 2+ threads and "
           "max_batch > 1), on or off (measured: bench/bench_arrivals.py)", metavar="MODE"),
    Option("compile", "compile", _bool,
           "apply torch.compile to the model at start, before READY (the log gives the compile time)", "on"),
    Option("http_host", "http_host", _string, "address of the optional HTTP API", metavar="HOST"),
    Option("http_port", "http_port", _optional(_port),
           "port of the HTTP API; unset or 'off' disables it (0 picks a free port)", metavar="PORT"),
    Option("http_token", "http_token", _optional(_string),
           "bearer token the HTTP API requires (prefer the environment: flags show up in ps)",
           metavar="TOKEN"),
    Option("cors_origin", "http_cors_origins", _string,
           "origin allowed to call the HTTP API from a browser; repeat for several (env: comma-separated)",
           "list", metavar="ORIGIN"),
    Option("http_max_body", "http_max_body", _positive_int, "largest HTTP request body in bytes",
           metavar="BYTES"),
    Option("static_host", "static_host", _string, "address of the static file server for cached WAVs",
           metavar="HOST"),
    Option("static_port", "static_port", _port, "port of the static file server (0 picks a free port)",
           metavar="PORT"),
    Option("static", "static_enabled", _bool, "do not start the static file server for cached WAVs", "off",
           flag="--no-static"),
    Option("queue_limit", "queue_limit", _non_negative_int,
           "most synthesis requests waiting beyond the free rows of the batch (--max-batch); more get BUSY",
           metavar="N"),
    Option("request_timeout", "request_timeout_s", _positive_float,
           "seconds a synthesis request may take, queue wait included, before TIMEOUT", metavar="SECONDS"),
    Option("max_text_chars", "max_text_chars", _positive_int, "longest text accepted, in characters",
           metavar="N"),
    Option("max_frame_bytes", "max_frame_bytes", _positive_int, "largest socket request frame in bytes",
           metavar="BYTES"),
    Option("max_connections", "max_connections", _positive_int, "most simultaneous socket connections",
           metavar="N"),
    Option("idle_timeout", "idle_timeout_s", _positive_float, "seconds before an idle connection is closed",
           metavar="SECONDS"),
    Option("max_connections_per_uid", "max_connections_per_uid", _non_negative_int,
           "socket connections one user (peer uid) may hold; 0 = half of max_connections; root and the "
           "daemon's own uid are exempt", metavar="N"),
    Option("grace", "grace_s", _non_negative_float,
           "seconds in-flight work may finish after SIGTERM before it is cut off", metavar="SECONDS"),
    Option("log_level", "log_level", _log_level, "debug, info, warning or error", metavar="LEVEL"),
    Option("max_upload_bytes", "max_upload_bytes", _positive_int, "largest preset (.npz) upload in bytes",
           metavar="BYTES"),
    Option("long_budget", "long_budget", _optional(_positive_int),
           "phoneme budget of one piece when long text is split", metavar="N"),
    Option("wyoming_uri", "wyoming_uri", _optional(_string),
           "serve the Wyoming protocol (Home Assistant) at tcp://HOST:PORT or unix://PATH; off when unset",
           metavar="URI"),
    Option("wyoming_allow_remote", "wyoming_allow_remote", _bool,
           "let --wyoming-uri listen on a non-loopback address (Wyoming has no authentication)", "on"),
    Option("encodec", "encodec", _string,
           "EnCodec 24 kHz weights for making voices from recordings (presets.create); loaded on first use "
           "(default: <models>/encodec_24khz-d7cc33bc.th)",
           "path", metavar="FILE"),
    Option("whisper", "whisper", _string,
           "Whisper checkpoint (e.g. medium.pt) that transcribes a recording sent without a transcript; "
           "needs the asr extra; loaded on first use (default: <models>/whisper/medium.pt)", "path",
           metavar="FILE"),
    Option("whisper_idle", "whisper_idle_s", _non_negative_float,
           "seconds without a transcription after which Whisper is unloaded (medium holds about 3 GB); "
           "0 keeps it loaded", metavar="SECONDS"),
    Option("max_audio_bytes", "max_audio_bytes", _positive_int,
           "largest recording accepted by presets.create and POST /v1/audio/voices, in bytes",
           metavar="BYTES"),
    Option("voice_aliases", "voice_aliases", _aliases,
           "voice name of /v1/audio/speech that speaks with a preset, NAME=PRESET; repeat for several; "
           "added to the built-in table of OpenAI's voice names (TOML: a [voice_aliases] table; "
           "env: comma-separated)", "map", flag="--voice-alias", metavar="NAME=PRESET"),
    # vallexd-ray only (the daemon accepts and ignores them, so one file serves both).
    Option("ray_address", "ray_address", _optional(_string),
           "vallexd-ray: Ray cluster to join (auto, or HOST:PORT of `ray start --head`); unset starts a "
           "local Ray instance", metavar="ADDRESS"),
    Option("ray_replicas", "ray_replicas", _positive_int,
           "vallexd-ray: model replicas (each loads the whole model) when autoscaling is off", metavar="N"),
    Option("ray_replica_cpus", "ray_replica_cpus", _positive_float,
           "vallexd-ray: CPUs each replica reserves (fractions allowed)", metavar="CPUS"),
    Option("ray_replica_gpus", "ray_replica_gpus", _non_negative_float,
           "vallexd-ray: GPUs each replica reserves (1 = one GPU each; 0.5 = two replicas per GPU)",
           metavar="GPUS"),
    Option("ray_min_replicas", "ray_min_replicas", _optional(_non_negative_int),
           "vallexd-ray: with ray_max_replicas, autoscale between these counts", metavar="N"),
    Option("ray_max_replicas", "ray_max_replicas", _optional(_positive_int),
           "vallexd-ray: with ray_min_replicas, autoscale between these counts", metavar="N"),
    Option("ray_target_ongoing", "ray_target_ongoing", _positive_float,
           "vallexd-ray: autoscaling aims at this many requests in progress per replica", metavar="N"),
)
_BY_KEY = {opt.key: opt for opt in OPTIONS}
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}


def _help(opt: Option) -> str:
    """The option's help plus its built-in default (paths depend on the environment: see epilog)."""
    default = _FIELD_DEFAULTS.get(opt.field, dataclasses.MISSING)
    # Paths under the models folder say their default in their own help (it depends on the environment).
    own_default = ("socket_mode", "encodec", "whisper")
    if default is dataclasses.MISSING or opt.kind in ("off", "on") or opt.field in own_default:
        return opt.help
    if default is None or default == ():
        return opt.help + " (default: unset)"
    return f"{opt.help} (default: {default})"


DESCRIPTION = "Local speech-synthesis daemon for the VALL-E X zero-shot TTS model."


def build_parser(prog: str = "vallexd", description: str = DESCRIPTION) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=(
            "Every option can also be set in the TOML file given by --config (key = the flag name with "
            "'_' for '-', e.g. http_port = 8081; static = false) or in the environment as VALLEXD_<KEY> "
            "(e.g. VALLEXD_HTTP_PORT=8081). Priority: flags > environment > file > defaults. "
            "Default paths: under systemd the unit's RUNTIME_DIRECTORY/vallexd.sock, "
            "STATE_DIRECTORY/presets, STATE_DIRECTORY/models and CACHE_DIRECTORY; otherwise "
            "$XDG_RUNTIME_DIR/vallexd/vallexd.sock, $XDG_DATA_HOME/vallexd/presets, "
            "$XDG_DATA_HOME/vallexd/models/{vallex-checkpoint.pt,vocos-encodec-24khz,encodec_24khz-d7cc33bc.th,"
            "whisper/medium.pt} and "
            "$XDG_CACHE_HOME/vallexd."
        ),
    )
    # SUPPRESS: an absent flag leaves no attribute, so it cannot shadow the lower sources.
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML configuration file (also VALLEXD_CONFIG)")
    for opt in OPTIONS:
        if opt.kind in ("off", "on"):
            parser.add_argument(opt.flag_name, dest=opt.key, action="store_const",
                                const="false" if opt.kind == "off" else "true",
                                default=argparse.SUPPRESS, help=_help(opt))
        elif opt.kind in ("paths", "list", "map"):
            parser.add_argument(opt.flag_name, dest=opt.key, action="append", metavar=opt.metavar,
                                default=argparse.SUPPRESS, help=_help(opt))
        else:
            parser.add_argument(opt.flag_name, dest=opt.key, metavar=opt.metavar,
                                default=argparse.SUPPRESS, help=_help(opt))
    return parser


def _convert(opt: Option, raw: Any, source: str, base: Path) -> Any:
    """Typed value of one option from one source; paths are made absolute against `base`."""
    try:
        if opt.kind == "paths":
            items = raw.split(os.pathsep) if isinstance(raw, str) else raw
            if not isinstance(items, list) or not items:
                raise ValueError(f"expected a non-empty list of folders, got {raw!r}")
            paths = tuple(_make_path(opt.parse(item), base) for item in items if item != "")
            if not paths:
                raise ValueError(f"expected at least one folder, got {raw!r}")
            return paths
        if opt.kind == "list":
            return _str_list(raw)
        if opt.kind == "map":
            return opt.parse(raw)
        value = opt.parse(raw)
        if opt.kind == "path" and value is not None:
            return _make_path(value, base)
        return value
    except ValueError as exc:
        raise ConfigError(source, opt.key, str(exc)) from None


def _make_path(text: str, base: Path) -> Path:
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~nosuchuser/...", or "~" without a home directory
        raise ValueError(f"cannot expand the home directory in {text!r}") from None
    return path if path.is_absolute() else base / path


def _read_toml(path: Path) -> dict[str, Any]:
    source = f"config file {path}"
    try:
        text = path.read_bytes().decode("utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(source, "config", f"cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(source, "config", f"not valid TOML: {exc}") from None
    if "socket_mode" in data:
        data["socket_mode"] = _mode_as_written(text, data["socket_mode"])
    for key, value in data.items():
        if key not in _BY_KEY:
            raise ConfigError(source, key, "unknown key")
        if isinstance(value, dict) and _BY_KEY[key].kind != "map":
            raise ConfigError(source, key, "expected a value, got a table")
    return data


def _mode_as_written(text: str, value: Any) -> Any:
    """TOML `socket_mode = 660` is the decimal integer 660: read its digits as octal, as systemd's
    SocketMode= does. Only a literal written `0o660` is taken as the number it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        written = re.search(r"(?m)^\s*socket_mode\s*=\s*([0-9a-zA-Z_+]+)", text)
        if written is None or not written.group(1).lower().startswith("0o"):
            return str(value)  # _mode parses the digits as octal (and refuses 8s and 9s)
    return value


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per VALLEXD_* variable that is no option (a typo is otherwise silently ignored)."""
    import difflib

    env = os.environ if environ is None else environ
    known = {opt.env for opt in OPTIONS} | {ENV_PREFIX + "CONFIG"}
    warnings = []
    keys = sorted(name.removeprefix(ENV_PREFIX) for name in known)  # the shared prefix is no likeness
    for name in sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known):
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), keys, n=1)
        hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else \
            " (`vallexd --help` lists the options)"
        warnings.append(f"unknown environment variable {name} is ignored{hint}")
    return warnings


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                prog: str = "vallexd", description: str = DESCRIPTION) -> Config:
    """Build the Config once: defaults < TOML < VALLEXD_* environment < flags (`prog` and
    `description`: the command's --help and usage errors)."""
    env = os.environ if environ is None else environ
    args = vars(build_parser(prog, description).parse_args(list(sys.argv[1:] if argv is None else argv)))
    cwd = Path.cwd()
    paths = default_paths(env)
    values: dict[str, Any] = {
        "socket_path": paths.socket_path,
        "checkpoint": paths.checkpoint,
        "vocos_dir": paths.vocos_dir,
        "presets_dirs": (paths.presets_dir,),
        "cache_dir": paths.cache_dir,
        "encodec": paths.encodec,
        "whisper": paths.whisper,
    }

    flag_config = args.pop("config", None)
    config_file = flag_config or env.get(ENV_PREFIX + "CONFIG") or None
    if config_file:
        try:
            toml_path = _make_path(config_file, cwd)
        except ValueError as exc:
            where = "flag --config" if flag_config else f"environment variable {ENV_PREFIX}CONFIG"
            raise ConfigError(where, "config", str(exc)) from None
        for key, raw in _read_toml(toml_path).items():
            opt = _BY_KEY[key]
            values[opt.field] = _convert(opt, raw, f"config file {toml_path}", toml_path.parent)

    for opt in OPTIONS:
        if opt.env in env:
            values[opt.field] = _convert(opt, env[opt.env], f"environment variable {opt.env}", cwd)

    for key, raw in args.items():
        opt = _BY_KEY[key]
        values[opt.field] = _convert(opt, raw, f"flag {opt.flag_name}", cwd)

    # Configured aliases extend (and may override) the built-in table rather than replace it.
    values["voice_aliases"] = {**DEFAULT_VOICE_ALIASES, **values.get("voice_aliases", {})}
    socket_path: Path = values["socket_path"]
    values["lock_path"] = socket_path.with_name(socket_path.name + ".lock")
    return Config(**values)
