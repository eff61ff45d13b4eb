"""`voice_aliases`: OpenAI voice names -> presets, from TOML table, environment or repeated flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from vallexd.config.options import load_config
from vallexd.config.settings import DEFAULT_VOICE_ALIASES, ConfigError


def test_defaults_cover_openai_voices() -> None:
    aliases = load_config([], {}).voice_aliases
    assert aliases == DEFAULT_VOICE_ALIASES
    assert {"alloy", "echo", "fable", "onyx", "nova", "shimmer"} <= set(aliases)


def test_sources_extend_the_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "vallexd.toml"
    toml.write_text('[voice_aliases]\nalloy = "Mika"\nbob = "Y\'shtola"\n')
    config = load_config(["--config", str(toml)], {})
    assert config.voice_aliases["alloy"] == "Mika" and config.voice_aliases["bob"] == "Y'shtola"
    assert config.voice_aliases["echo"] == DEFAULT_VOICE_ALIASES["echo"]
    config = load_config(["--voice-alias", "nova=Mika", "--voice-alias", "x=y"], {})
    assert config.voice_aliases["nova"] == "Mika" and config.voice_aliases["x"] == "y"
    assert load_config([], {"VALLEXD_VOICE_ALIASES": "a=b, c=d"}).voice_aliases["c"] == "d"


@pytest.mark.parametrize("value", ["alloy", "alloy=../etc", "alloy="])
def test_bad_alias_names_the_source(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(["--voice-alias", value], {})
    assert err.value.details["key"] == "voice_aliases"
