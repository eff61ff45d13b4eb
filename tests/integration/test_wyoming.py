"""The Wyoming server of a real daemon (tiny weights), driven by the `wyoming` package's own client."""

from __future__ import annotations

import asyncio
import io
import wave
from typing import Any

import numpy as np
import pytest
from daemon_harness import DaemonProcess
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from vallexd.constants import SAMPLE_RATE
from vallexd.server.wyoming import complete_sentences, parse_uri, request_language
from vallexd.storage.prompts import Prompt, save_prompt

READ_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, daemon_factory: Any) -> DaemonProcess:
    workdir = tmp_path_factory.mktemp("wyoming") / "d"
    presets = workdir / "presets"
    presets.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, lang in (("Ann", "en"), ("Mika", "ja")):
        save_prompt(Prompt(rng.integers(0, 1024, (1, 6, 8)), np.array([[5, 6, 7, 8]]), lang),
                    presets / f"{name}.npz")
    return daemon_factory("wyoming", ["--wyoming-uri", "tcp://127.0.0.1:0", "--threads", "1"],
                          workdir=workdir)


def wyoming_uri(daemon: DaemonProcess) -> str:
    return daemon.wait_log(r"Wyoming server at (tcp://127\.0\.0\.1:\d+)").group(1)


async def read_until(client: AsyncClient, stop_types: tuple[str, ...]) -> list[Event]:
    events: list[Event] = []
    while True:
        event = await asyncio.wait_for(client.read_event(), READ_TIMEOUT_S)
        assert event is not None, f"connection closed after {[e.type for e in events]}"
        events.append(event)
        if event.type in stop_types:
            return events


def pcm_of(events: list[Event]) -> bytes:
    starts = [e for e in events if AudioStart.is_type(e.type)]
    assert len(starts) == 1
    fmt = AudioStart.from_event(starts[0])
    assert (fmt.rate, fmt.width, fmt.channels) == (SAMPLE_RATE, 2, 1)
    chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
    assert chunks and all((c.rate, c.width, c.channels) == (SAMPLE_RATE, 2, 1) for c in chunks)
    return b"".join(c.audio for c in chunks)


async def test_describe_lists_presets_as_voices(daemon: DaemonProcess) -> None:
    async with AsyncClient.from_uri(wyoming_uri(daemon)) as client:
        await client.write_event(Describe().event())
        info = Info.from_event((await read_until(client, ("info",)))[-1])
    assert len(info.tts) == 1
    program = info.tts[0]
    assert program.name == "vallexd" and program.installed and program.supports_synthesize_streaming
    voices = {v.name: v.languages for v in program.voices}
    assert voices == {"Ann": ["en", "zh", "ja"], "Mika": ["ja", "en", "zh"]}


async def test_synthesize_matches_the_wav_result(daemon: DaemonProcess) -> None:
    text = "Good morning, how are you?"
    async with AsyncClient.from_uri(wyoming_uri(daemon)) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name="Ann")).event())
        events = await read_until(client, ("audio-stop", "error"))
    assert AudioStop.is_type(events[-1].type), events[-1]
    pcm = pcm_of(events)
    # The same request over the socket: answered from the cache the Wyoming request filled.
    result = daemon.call("synthesize", {"text": text, "voice": "Ann", "language": "auto"})
    assert result["cached"] is True
    with wave.open(io.BytesIO(result["audio"]), "rb") as wav:
        assert len(pcm) // 2 == wav.getnframes() > 0
        assert pcm == wav.readframes(wav.getnframes())


async def test_streaming_speaks_before_the_text_is_complete(daemon: DaemonProcess) -> None:
    async with AsyncClient.from_uri(wyoming_uri(daemon)) as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="Mika")).event())
        await client.write_event(SynthesizeChunk(text="The first sentence is here. The sec").event())
        # Nothing more is sent until the first sentence's audio is there.
        early = await read_until(client, ("audio-chunk", "error"))
        assert AudioChunk.is_type(early[-1].type), early[-1]
        await client.write_event(SynthesizeChunk(text="ond one follows! And a thi").event())
        await client.write_event(SynthesizeChunk(text="rd one ends it.").event())
        # What a streaming client also sends for old servers: must not be spoken twice.
        await client.write_event(Synthesize(text="The first sentence is here. The second one follows! "
                                                 "And a third one ends it.").event())
        await client.write_event(SynthesizeStop().event())
        rest = await read_until(client, ("synthesize-stopped", "error"))
    events = early + rest
    types = [e.type for e in events]
    assert SynthesizeStopped.is_type(types[-1]), types
    assert types.count("audio-start") == 1 and types.count("audio-stop") == 1
    assert types.index("audio-stop") == len(types) - 2
    # Three sentences, each synthesized (and cached) on its own: same audio as asking for each.
    expected = b""
    for sentence in ("The first sentence is here. ", "The second one follows! ", "And a third one ends it."):
        result = daemon.call("synthesize", {"text": sentence, "voice": "Mika", "language": "auto"})
        assert result["cached"] is True, sentence
        with wave.open(io.BytesIO(result["audio"]), "rb") as wav:
            expected += wav.readframes(wav.getnframes())
    assert pcm_of(events) == expected


async def test_unknown_voice_is_an_error_event(daemon: DaemonProcess) -> None:
    async with AsyncClient.from_uri(wyoming_uri(daemon)) as client:
        await client.write_event(Synthesize(text="Hello.", voice=SynthesizeVoice(name="Nobody")).event())
        events = await read_until(client, ("error", "audio-stop"))
        error = Error.from_event(events[-1])
        assert error.code == "NOT_FOUND" and "Nobody" in error.text
        assert not any(AudioStart.is_type(e.type) for e in events)
        # The connection still works afterwards.
        await client.write_event(Describe().event())
        assert (await read_until(client, ("info",)))[-1].type == "info"


async def test_client_hanging_up_cancels_its_synthesis(daemon: DaemonProcess) -> None:
    errors = daemon.call("status")["counters"]["errors"]
    async with AsyncClient.from_uri(wyoming_uri(daemon)) as client:
        await client.write_event(Synthesize(text="A sentence nobody will ever hear, spoken for nobody.",
                                            voice=SynthesizeVoice(name="Ann")).event())
    # EOF: the request is cancelled (counted as an error of the service), the utterance logged so.
    daemon.wait_log(r"wyoming synthesize \d+ms error=TIMEOUT/CANCELLED", timeout=60)
    deadline = asyncio.get_running_loop().time() + 60
    while daemon.call("status")["counters"]["errors"] == errors:
        assert asyncio.get_running_loop().time() < deadline, "the service request was not cancelled"
        await asyncio.sleep(0.1)


async def test_oversized_event_closes_the_connection(daemon: DaemonProcess) -> None:
    async with AsyncClient.from_uri(wyoming_uri(daemon)) as client:
        assert client._writer is not None
        client._writer.write(b'{"type": "synthesize", "data_length": 1000000000}\n')
        await client._writer.drain()
        assert await asyncio.wait_for(client.read_event(), 10) is None


def test_uri_rules() -> None:
    assert parse_uri("tcp://127.0.0.1:10200", False) == ("tcp", "127.0.0.1", 10200)
    assert parse_uri("unix:///run/x.sock", False) == ("unix", "/run/x.sock", None)
    with pytest.raises(Exception, match="wyoming-allow-remote"):
        parse_uri("tcp://0.0.0.0:10200", False)
    assert parse_uri("tcp://0.0.0.0:10200", True)[1] == "0.0.0.0"
    for bad in ("tcp://127.0.0.1", "http://x:1", "unix://"):
        with pytest.raises(Exception, match=r"wyoming-uri"):
            parse_uri(bad, False)


def test_sentences_as_text_arrives() -> None:
    assert complete_sentences("Hello there. How", "auto") == (["Hello there. "], "How")
    assert complete_sentences("Hello there.", "en") == ([], "Hello there.")  # "." may be "3.5"
    assert complete_sentences("Ask Dr. Smith", "en") == ([], "Ask Dr. Smith")
    assert complete_sentences("今日は晴れ。明日", "auto") == (["今日は晴れ。"], "明日")
    assert request_language("en_US") == "en" and request_language("zh-CN") == "zh"
    assert request_language("de") == "auto" and request_language(None) == "auto"


def test_refuses_remote_without_flag(daemon_factory: Any, tmp_path: Any, tiny_models: Any) -> None:
    from daemon_harness import start_daemon

    d = start_daemon(tmp_path / "d", tiny_models, ["--wyoming-uri", "tcp://0.0.0.0:0"], wait=False)
    assert d.wait(60) == 2
    assert "wyoming-allow-remote" in d.log_text()


async def test_unix_socket_uri(tmp_path: Any, tiny_models: Any) -> None:
    from daemon_harness import start_daemon

    path = tmp_path / "wyoming.sock"
    d = start_daemon(tmp_path / "d", tiny_models, ["--wyoming-uri", f"unix://{path}", "--threads", "1"])
    try:
        assert oct(path.stat().st_mode & 0o777) == oct(0o660)
        async with AsyncClient.from_uri(f"unix://{path}") as client:
            await client.write_event(Describe().event())
            assert (await read_until(client, ("info",)))[-1].type == "info"
    finally:
        assert d.stop() == 0
    assert not path.exists()  # removed at exit
