"""`speak`'s output format: --format, else -o's extension, else wav; a clash of the two is refused."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from vallexctl.commands.speak_stream import infer_format


def test_format_from_flag_extension_or_default() -> None:
    assert infer_format(Path("hi.mp3"), None) == "mp3"
    assert infer_format(Path("hi.OGG"), None) == "opus"
    assert infer_format(Path("hi.bin"), "flac") == "flac"  # an unknown extension does not clash
    assert infer_format(Path("hi.wav"), "wav") == "wav"
    assert infer_format(None, None) == "wav"


def test_a_format_that_contradicts_the_file_name_is_a_usage_error() -> None:
    with pytest.raises(click.UsageError) as info:
        infer_format(Path("conflict.wav"), "mp3")
    assert "conflict.wav names wav audio but --format is mp3" in info.value.message
    assert ".mp3" in info.value.message
