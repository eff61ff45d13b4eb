"""Config: defaults < TOML < VALLEXD_* env < flags; systemd/XDG defaults; every bad value names its source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vallexd.config import Config, ConfigError, build_parser, default_paths, load_config

XDG_ENV = {"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1000"}


def test_xdg_defaults() -> None:
    cfg = load_config([], XDG_ENV)
    assert cfg.socket_path == Path("/run/user/1000/vallexd/vallexd.sock")
    assert cfg.lock_path == Path("/run/user/1000/vallexd/vallexd.sock.lock")
    assert cfg.cache_dir == Path("/home/u/.cache/vallexd")
    assert cfg.presets_dirs == (Path("/home/u/.local/share/vallexd/presets"),)
    assert cfg.presets_install_dir == Path("/home/u/.local/share/vallexd/presets")
    assert cfg.checkpoint == Path("/home/u/.local/share/vallexd/models/vallex-checkpoint.pt")
    assert cfg.vocos_dir == Path("/home/u/.local/share/vallexd/models/vocos-encodec-24khz")
    assert (cfg.device, cfg.dtype, cfg.socket_mode, cfg.http_port, cfg.static_port) == ("auto", "auto", 0o660,
                                                                                         None, 8080)
    assert cfg.static_enabled and cfg.http_host == "127.0.0.1" and cfg.log_level == "INFO"


def test_xdg_overrides_and_no_runtime_dir() -> None:
    env = {"HOME": "/home/u", "XDG_CACHE_HOME": "/c", "XDG_DATA_HOME": "/d"}
    paths = default_paths(env)
    assert paths.cache_dir == Path("/c/vallexd")
    assert paths.presets_dir == Path("/d/vallexd/presets")
    assert paths.checkpoint == Path("/d/vallexd/models/vallex-checkpoint.pt")
    # No XDG_RUNTIME_DIR (no logind session): a per-uid folder, never a shared fixed path.
    assert paths.socket_path.parent.name.startswith("vallexd-")


def test_systemd_defaults() -> None:
    env = {**XDG_ENV, "RUNTIME_DIRECTORY": "/run/vallexd", "STATE_DIRECTORY": "/var/lib/vallexd",
           "CACHE_DIRECTORY": "/var/cache/vallexd:/var/cache/other"}
    cfg = load_config([], env)
    assert cfg.socket_path == Path("/run/vallexd/vallexd.sock")
    assert cfg.presets_dirs == (Path("/var/lib/vallexd/presets"),)
    assert cfg.cache_dir == Path("/var/cache/vallexd")  # first entry of a list
    assert cfg.checkpoint == Path("/var/lib/vallexd/models/vallex-checkpoint.pt")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_priority_defaults_toml_env_flags(tmp_path: Path) -> None:
    toml = _write(tmp_path / "v.toml",
                  'queue_limit = 3\nhttp_port = 8001\ndevice = "cpu"\nsocket = "rel.sock"\n')
    env = {**XDG_ENV, "VALLEXD_QUEUE_LIMIT": "4", "VALLEXD_HTTP_PORT": "8002"}
    flags = ["--config", str(toml), "--queue-limit", "5"]
    cfg = load_config(flags, env)
    assert cfg.queue_limit == 5  # flag beats env
    assert cfg.http_port == 8002  # env beats file
    assert cfg.device == "cpu"  # file beats default
    assert cfg.socket_path == tmp_path / "rel.sock"  # relative paths in a file: relative to the file
    assert cfg.lock_path == tmp_path / "rel.sock.lock"
    assert load_config(["--config", str(toml)], env).queue_limit == 4
    assert load_config(["--config", str(toml)], XDG_ENV).queue_limit == 3
    assert load_config([], XDG_ENV).queue_limit == Config.queue_limit
    # The file can also come from the environment.
    assert load_config([], {**XDG_ENV, "VALLEXD_CONFIG": str(toml)}).queue_limit == 3


def test_lists_from_each_source(tmp_path: Path) -> None:
    toml = _write(tmp_path / "v.toml", 'presets_dir = ["/p1", "p2"]\ncors_origin = ["https://a.example"]\n')
    cfg = load_config(["--config", str(toml)], XDG_ENV)
    assert cfg.presets_dirs == (Path("/p1"), tmp_path / "p2")
    assert cfg.http_cors_origins == ("https://a.example",)
    cfg = load_config([], {**XDG_ENV, "VALLEXD_PRESETS_DIR": "/e1:/e2", "VALLEXD_CORS_ORIGIN": "http://x, http://y"})
    assert cfg.presets_dirs == (Path("/e1"), Path("/e2"))
    assert cfg.http_cors_origins == ("http://x", "http://y")
    cfg = load_config(["--presets-dir", "/f1", "--presets-dir", "/f2", "--cors-origin", "http://z"], XDG_ENV)
    assert cfg.presets_dirs == (Path("/f1"), Path("/f2")) and cfg.presets_install_dir == Path("/f1")
    assert cfg.http_cors_origins == ("http://z",)


def test_value_forms() -> None:
    argv = ["--socket-mode", "0o600", "--no-static", "--http-port", "0", "--log-level", "debug",
            "--device", "cuda:1", "--dtype", "bfloat16", "--grace", "0", "--request-timeout", "2.5"]
    cfg = load_config(argv, XDG_ENV)
    assert cfg.socket_mode == 0o600 and not cfg.static_enabled and cfg.http_port == 0
    assert cfg.log_level == "DEBUG" and cfg.device == "cuda:1" and cfg.dtype == "bfloat16"
    assert cfg.grace_s == 0.0 and cfg.request_timeout_s == 2.5
    assert cfg.quantize == "none" and load_config(["--quantize", "NAR"], XDG_ENV).quantize == "nar"
    assert load_config([], {**XDG_ENV, "VALLEXD_QUANTIZE": "all"}).quantize == "all"
    env = {**XDG_ENV, "VALLEXD_HTTP_PORT": "8081", "VALLEXD_STATIC": "false", "VALLEXD_SOCKET_MODE": "640"}
    cfg = load_config(["--http-port", "off"], env)  # a flag can switch off what env turned on
    assert cfg.http_port is None and not cfg.static_enabled and cfg.socket_mode == 0o640


BAD_FLAGS = [
    (["--http-port", "70000"], "http_port"),
    (["--http-port", "-1"], "http_port"),
    (["--static-port", "abc"], "static_port"),
    (["--device", "tpu"], "device"),
    (["--dtype", "int8"], "dtype"),
    (["--quantize", "int4"], "quantize"),
    (["--queue-limit", "-1"], "queue_limit"),
    (["--queue-limit", "1.5"], "queue_limit"),
    (["--request-timeout", "0"], "request_timeout"),
    (["--request-timeout", "nan"], "request_timeout"),
    (["--max-text-chars", "0"], "max_text_chars"),
    (["--max-frame-bytes", "-5"], "max_frame_bytes"),
    (["--max-connections", "0"], "max_connections"),
    (["--idle-timeout", "-1"], "idle_timeout"),
    (["--grace", "-1"], "grace"),
    (["--socket-mode", "999"], "socket_mode"),
    (["--log-level", "loud"], "log_level"),
    (["--nar-thread", "yes"], "nar_thread"),
    (["--socket", ""], "socket"),
]


@pytest.mark.parametrize(("argv", "key"), BAD_FLAGS)
def test_bad_flag_values(argv: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(argv, XDG_ENV)
    err = info.value
    assert err.reason == "BAD_CONFIG"
    assert err.details == {"source": f"flag {argv[0]}", "key": key}
    assert key in err.message and argv[0] in err.message


@pytest.mark.parametrize(
    ("env", "key"),
    [({"VALLEXD_HTTP_PORT": "abc"}, "http_port"), ({"VALLEXD_STATIC": "maybe"}, "static"),
     ({"VALLEXD_QUEUE_LIMIT": "-2"}, "queue_limit"), ({"VALLEXD_DEVICE": "gpu"}, "device"),
     ({"VALLEXD_PRESETS_DIR": ":"}, "presets_dir"), ({"VALLEXD_SOCKET_MODE": "rw"}, "socket_mode")],
)
def test_bad_env_values(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([], {**XDG_ENV, **env})
    var = next(iter(env))
    assert info.value.details == {"source": f"environment variable {var}", "key": key}
    assert var in info.value.message


@pytest.mark.parametrize(
    ("content", "key", "problem"),
    [
        ("bogus = 1\n", "bogus", "unknown key"),
        ("http_port = 70000\n", "http_port", "0..65535"),
        ('http_port = "x"\n', "http_port", "integer"),
        ("queue_limit = true\n", "queue_limit", "integer"),  # TOML true is not 1
        ("presets_dir = []\n", "presets_dir", "non-empty"),
        ("[table]\nx = 1\n", "table", "unknown key"),
        ("queue_limit = \n", "config", "not valid TOML"),
    ],
)
def test_bad_toml(tmp_path: Path, content: str, key: str, problem: str) -> None:
    toml = _write(tmp_path / "bad.toml", content)
    with pytest.raises(ConfigError) as info:
        load_config(["--config", str(toml)], XDG_ENV)
    assert info.value.details == {"source": f"config file {toml}", "key": key}
    assert problem in info.value.message


def test_unreadable_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(["--config", str(tmp_path / "missing.toml")], XDG_ENV)
    assert "cannot read" in info.value.message and "missing.toml" in info.value.message
    folder = tmp_path / "dir.toml"
    folder.mkdir()
    with pytest.raises(ConfigError):
        load_config(["--config", str(folder)], XDG_ENV)


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--socket", "--socket-mode", "--socket-group", "--checkpoint", "--vocos",
                 "--presets-dir", "--cache-dir", "--device", "--dtype", "--http-host", "--http-port",
                 "--http-token", "--cors-origin", "--static-host", "--static-port", "--no-static",
                 "--queue-limit", "--request-timeout", "--max-text-chars", "--max-frame-bytes",
                 "--max-connections", "--idle-timeout", "--grace", "--log-level"):
        assert flag in out
    assert "VALLEXD_" in out and "XDG_RUNTIME_DIR" in out


def test_config_is_read_once() -> None:
    """The environment is read when the Config is built; later changes do not leak into it."""
    env = {**XDG_ENV, "VALLEXD_QUEUE_LIMIT": "3"}
    cfg = load_config([], env)
    env["VALLEXD_QUEUE_LIMIT"] = "9"
    assert cfg.queue_limit == 3
    assert load_config([], env).queue_limit == 9


def test_torch_free_modules() -> None:
    """The client imports config (and the service core must not drag torch onto the event loop)."""
    code = ("import sys, vallexd.config, vallexd.service.requests, vallexd.storage.wav, "
            "vallexd.storage.cache, vallexd.service.service; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_unknown_user_in_path_is_a_config_error() -> None:
    user = "nosuchuser-vallexd-test"
    with pytest.raises(ConfigError) as info:
        load_config(["--cache-dir", f"~{user}/cache"], XDG_ENV)
    assert info.value.details["key"] == "cache_dir" and user in info.value.message
    with pytest.raises(ConfigError) as info:
        load_config(["--config", f"~{user}/vallexd.toml"], XDG_ENV)
    assert info.value.details == {"source": "flag --config", "key": "config"}


def test_threads_from_env_and_flag() -> None:
    assert load_config([], XDG_ENV).threads == 0  # torch's default
    assert load_config([], {**XDG_ENV, "VALLEXD_THREADS": "2"}).threads == 2
    assert load_config(["--threads", "1"], {**XDG_ENV, "VALLEXD_THREADS": "2"}).threads == 1
    with pytest.raises(ConfigError):
        load_config(["--threads", "-1"], XDG_ENV)


def test_nar_thread_modes() -> None:
    assert load_config([], XDG_ENV).nar_thread == "auto"
    assert load_config([], {**XDG_ENV, "VALLEXD_NAR_THREAD": "OFF"}).nar_thread == "off"
    assert load_config(["--nar-thread", "on"], {**XDG_ENV, "VALLEXD_NAR_THREAD": "off"}).nar_thread == "on"
