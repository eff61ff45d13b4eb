"""Issue 14 items 6 and 19: TOML socket_mode as systemd writes it; unknown VALLEXD_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from vallexd.config.options import load_config, unknown_environment
from vallexd.config.settings import ConfigError


@pytest.mark.parametrize(("written", "mode"), [("600", 0o600), ("0o640", 0o640), ('"660"', 0o660),
                                               ("0660", None), ("680", None), ("0o1130", None)])
def test_toml_socket_mode(tmp_path: Path, written: str, mode: int | None) -> None:
    config = tmp_path / "v.toml"
    config.write_text(f"socket_mode = {written}  # as in SocketMode=\n")
    if mode is None:  # TOML refuses a leading zero; 8 is no octal digit; over 0o777
        with pytest.raises(ConfigError):
            load_config(["--config", str(config)], {})
    else:
        assert load_config(["--config", str(config)], {}).socket_mode == mode


def test_unknown_environment_variables_are_named_with_a_guess() -> None:
    env = {"VALLEXD_QUEUE_LIMT": "3", "VALLEXD_QUEUE_LIMIT": "3", "VALLEXD_CONFIG": "x", "VALLEXD_ZZZ": "1",
           "HOME": "/h"}
    assert unknown_environment(env) == [
        "unknown environment variable VALLEXD_QUEUE_LIMT is ignored (did you mean VALLEXD_QUEUE_LIMIT?)",
        "unknown environment variable VALLEXD_ZZZ is ignored (`vallexd --help` lists the options)",
    ]
