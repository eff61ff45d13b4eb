"""The OpenAI request mapping and error shape, without a daemon (the real-client tests are in
tests/integration/test_openai_api.py)."""

from __future__ import annotations

from typing import Any

import pytest

from vallexd.config.settings import DEFAULT_VOICE_ALIASES
from vallexd.errors import Busy, InvalidArgument, NotFound, Unauthenticated
from vallexd.server.openai_api import resolve_voice, speech_params
from vallexd.server.transport import to_openai_error

INSTALLED = {"Mika", "acou_1"}


def test_speech_params_map_to_synthesize() -> None:
    params, stream = speech_params({"model": "tts-1", "input": "Hi.", "voice": "alloy", "speed": 1.5,
                                    "instructions": "calm", "seed": 3, "language": "en"},
                                   DEFAULT_VOICE_ALIASES, INSTALLED)
    assert stream is None
    assert params == {"text": "Hi.", "voice": "acou_1", "format": "mp3", "speed": 1.5, "seed": 3,
                      "language": "en"}
    params, stream = speech_params({"model": "vallex", "input": "Hi.", "voice": {"id": "Mika"},
                                    "response_format": "pcm", "stream_format": "sse"},
                                   DEFAULT_VOICE_ALIASES, INSTALLED)
    assert stream == "sse" and params["voice"] == "Mika" and params["format"] == "pcm"


@pytest.mark.parametrize("body, field", [
    ({"model": "whisper-1", "input": "Hi.", "voice": "Mika"}, "model"),
    ({"input": "Hi.", "voice": "Mika"}, "model"),
    ({"model": "tts-1", "input": "Hi.", "voice": "Mika", "stream_format": "chunks"}, "stream_format"),
    ({"model": "tts-1", "input": "Hi.", "voice": "Mika", "instructions": 3}, "instructions"),
    ({"model": "tts-1", "input": "Hi.", "voice": "Mika", "fresh": True}, "fresh"),
    ({"model": "tts-1", "input": "Hi."}, "voice"),
])
def test_speech_params_refuse(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        speech_params(body, DEFAULT_VOICE_ALIASES, INSTALLED)
    assert err.value.details["field"] == field


def test_unknown_voice_and_uninstalled_alias_are_404() -> None:
    with pytest.raises(NotFound) as err:
        resolve_voice("nobody", DEFAULT_VOICE_ALIASES, INSTALLED)
    assert err.value.details == {"field": "voice"}
    with pytest.raises(NotFound, match="vctk_2") as err:
        resolve_voice("nova", DEFAULT_VOICE_ALIASES, INSTALLED)
    # An installed preset wins over an alias of the same name.
    assert resolve_voice("Mika", {"Mika": "acou_1"}, INSTALLED) == "Mika"


def test_openai_error_shape() -> None:
    err = InvalidArgument("bad", reason="TEXT_TOO_LONG", details={"field": "text"})
    assert to_openai_error(err, {"text": "input"}) == {"error": {
        "message": "bad", "type": "invalid_request_error", "param": "input", "code": "text_too_long"}}
    assert to_openai_error(Unauthenticated("no", reason="BAD_TOKEN"))["error"]["code"] == "invalid_api_key"
    busy = to_openai_error(Busy("full", reason="QUEUE_FULL"))["error"]
    assert busy["type"] == "server_error" and busy["param"] is None and busy["code"] == "queue_full"
