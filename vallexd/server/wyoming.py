"""The optional Wyoming server (Home Assistant's protocol for local speech), on the `wyoming` package.

    --wyoming-uri tcp://127.0.0.1:10200   or   --wyoming-uri unix:///run/vallexd/wyoming.sock

Events (wyoming 1.x):

    describe                      -> info: one TTS program "vallexd", every installed preset as a
                                     voice (its own language first, then the others: VALL-E X speaks
                                     en, zh and ja with any voice), streaming supported
    synthesize {text, voice}      -> audio-start, audio-chunk* (16-bit mono 24 kHz), audio-stop
    synthesize-start {voice}, synthesize-chunk {text}*, [synthesize]?, synthesize-stop
                                  -> the same audio events, sentence by sentence as the text
                                     arrives (a sentence is spoken once the text after it has
                                     begun), then synthesize-stopped.  The plain `synthesize` a
                                     streaming client also sends, for old servers, is ignored.
    failures                      -> error {text, code}: code is the vallexd ErrorCode
                                     (NOT_FOUND for an unknown voice, BUSY, TIMEOUT, ...)

Wyoming has no authentication: anyone who can connect can make the daemon speak.  So a TCP
address must be loopback unless `--wyoming-allow-remote` says otherwise (then firewall it).

Synthesis runs in a task beside the event reader, so a client that hangs up mid-sentence is
noticed (EOF) and its work cancelled; a stream keeps at most LOOKAHEAD sentences submitted to
the shared service queue at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from vallexd import __version__
from vallexd.constants import LANGUAGES, SAMPLE_RATE
from vallexd.errors import InvalidArgument, Unavailable, VallexError, cancelled_error
from vallexd.server.http_api import is_loopback
from vallexd.server.metrics import Metrics
from vallexd.server.transport import DrainGate, ServiceLike, log_safe, outcome, to_wire_error
from vallexd.server.unix_socket import StartupError, bind_unix_socket, check_socket_path
from vallexd.storage.wav import SAMPLE_WIDTH, to_pcm16
from vallexd.text.split import sentences

log = logging.getLogger("vallexd.wyoming")
access_log = logging.getLogger("vallexd.access")

SAMPLES_PER_CHUNK = 2400  # 100 ms at 24 kHz per audio-chunk event
LOOKAHEAD = 2  # sentences of one stream in the service queue at once (the spoken one + the next)
METHODS = ("describe", "synthesize", "synthesize-stream")
ATTRIBUTION = Attribution(name="VALL-E X (Plachtaa), served by vallexd", url="https://github.com/Plachtaa/VALL-E-X")
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")


def parse_uri(uri: str, allow_remote: bool) -> tuple[str, str, int | None]:
    """("tcp", host, port) or ("unix", path, None); InvalidArgument(BAD_CONFIG) if unusable."""
    parsed = urlparse(uri)
    if parsed.scheme == "tcp":
        try:
            port = parsed.port
        except ValueError:
            port = None
        if not parsed.hostname or port is None:
            raise InvalidArgument(f"--wyoming-uri {uri!r}: give tcp://HOST:PORT", reason="BAD_CONFIG")
        if not allow_remote and not is_loopback(parsed.hostname):
            raise InvalidArgument(
                f"--wyoming-uri {uri!r} is not a loopback address; Wyoming has no authentication, so "
                "listening there needs --wyoming-allow-remote (and a firewall)", reason="BAD_CONFIG")
        return "tcp", parsed.hostname, port
    if parsed.scheme == "unix" and parsed.path:
        return "unix", parsed.path, None
    raise InvalidArgument(f"--wyoming-uri {uri!r}: use tcp://HOST:PORT or unix:///PATH", reason="BAD_CONFIG")


def request_language(language: str | None) -> str:
    """A Wyoming language ("en", "en_US", "zh-CN", ...) as a request language; "auto" if not ours."""
    base = re.split(r"[-_]", language or "", maxsplit=1)[0].lower()
    return base if base in LANGUAGES else "auto"


def complete_sentences(text: str, language: str) -> tuple[list[str], str]:
    """(the sentences of `text` that are surely complete, the rest still being written).

    A sentence is complete when the split would cut after it even if more text followed: so
    "Hello there. How" gives ["Hello there. "], "How", while "Dr." or "3." waits for more.
    """
    lang = language if language in LANGUAGES else ("zh" if _CJK_RE.search(text) else "en")
    parts = sentences(text + "A", lang)  # "A": stands for whatever comes next
    done = parts[:-1]
    return done, text[sum(len(p) for p in done):]


def pcm_chunks(audio: np.ndarray) -> list[bytes]:
    data = to_pcm16(audio).tobytes()
    step = SAMPLES_PER_CHUNK * SAMPLE_WIDTH
    return [data[i:i + step] for i in range(0, len(data), step)]


class _BoundedReader:
    """The connection's reader with a cap on the JSON data and payload an event may announce
    (wyoming reads whatever length the header says); over the cap the connection is closed."""

    def __init__(self, reader: asyncio.StreamReader, limit: int) -> None:
        self._reader = reader
        self._limit = limit

    async def readline(self) -> bytes:
        return await self._reader.readline()  # the stream's own line limit applies (64 KiB)

    async def readexactly(self, n: int) -> bytes:
        if n > self._limit:
            raise ValueError(f"event part of {n} bytes over the limit of {self._limit}")  # -> EOF
        return await self._reader.readexactly(n)

    def feed_eof(self) -> None:
        self._reader.feed_eof()


@dataclass(eq=False)
class _Sentence:
    text: str
    chunks: asyncio.Queue[np.ndarray | None] = field(default_factory=asyncio.Queue)
    error: BaseException | None = None
    task: asyncio.Task[Any] | None = None


class _Utterance:
    """One synthesize (one sentence list) or one synthesize-start..stop stream, spoken in order."""

    def __init__(self, handler: _Handler, params: dict[str, Any], method: str) -> None:
        self.handler = handler
        self.params = params  # voice / language for every sentence
        self.method = method
        self.cancelled = asyncio.Event()
        self.buffer = ""
        self.closed = False
        self._backlog: deque[str] = deque()
        self._order: asyncio.Queue[_Sentence | None] = asyncio.Queue()
        self._outstanding = 0
        self._end_queued = False
        self.task: asyncio.Task[None] | None = None

    # text in -------------------------------------------------------------
    def add_text(self, text: str) -> None:
        self.buffer += text
        done, self.buffer = complete_sentences(self.buffer, self.params.get("language", "auto"))
        for sentence in done:
            self._queue(sentence)

    def finish(self, rest: str | None = None) -> None:
        """No more text: speak what is left (`rest` replaces the sentence split for one-shot text)."""
        tail = self.buffer if rest is None else rest
        self.buffer = ""
        if tail.strip():
            self._queue(tail)
        self.closed = True
        self._pump()

    def _queue(self, sentence: str) -> None:
        if sentence.strip():
            self._backlog.append(sentence)
        self._pump()

    def _pump(self) -> None:
        while self._backlog and self._outstanding < LOOKAHEAD and not self.cancelled.is_set():
            job = _Sentence(self._backlog.popleft())
            self._outstanding += 1
            job.task = asyncio.get_running_loop().create_task(self._synthesize(job))
            self._order.put_nowait(job)
        if self.closed and not self._backlog and not self._end_queued:
            self._end_queued = True
            self._order.put_nowait(None)

    async def _synthesize(self, job: _Sentence) -> None:
        try:
            await self.handler.server.service.synthesize(
                {**self.params, "text": job.text}, cancelled=self.cancelled, on_audio=job.chunks.put_nowait)
        except Exception as exc:  # handed to the writer, which sends it as an error event
            job.error = exc
        finally:
            job.chunks.put_nowait(None)
            self._outstanding -= 1
            self._pump()

    # audio out -----------------------------------------------------------
    async def speak(self) -> None:
        """Write audio-start, the chunks of every sentence in order, audio-stop (or one error)."""
        started = time.monotonic()
        error: VallexError | None = None
        sent_start = False
        offset_ms = 0
        write = self.handler.write_event
        try:
            while (job := await self._order.get()) is not None:
                while (chunk := await job.chunks.get()) is not None:
                    if not sent_start:
                        await write(AudioStart(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=1,
                                               timestamp=0).event())
                        sent_start = True
                    for pcm in pcm_chunks(chunk):
                        await write(AudioChunk(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=1, audio=pcm,
                                               timestamp=offset_ms).event())
                        offset_ms += len(pcm) * 1000 // (SAMPLE_RATE * SAMPLE_WIDTH)
                if job.error is not None:
                    raise job.error
            if sent_start:
                await write(AudioStop(timestamp=offset_ms).event())
        except (ConnectionError, OSError, asyncio.CancelledError):
            self.cancelled.set()  # the client is gone: nothing to report to, nothing more to make
            error = cancelled_error()
            raise
        except Exception as exc:
            self.cancelled.set()  # the rest of a failed stream is not spoken
            error = to_wire_error(exc, "wyoming synthesize")
            with contextlib.suppress(ConnectionError, OSError):
                await write(Error(text=error.message, code=error.code.value).event())
        finally:
            self.handler.server.count(self.method, error, started)
        if self.method == "synthesize-stream" and error is None:
            await write(SynthesizeStopped().event())


class _Handler(AsyncEventHandler):
    """One client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 server: WyomingServer) -> None:
        super().__init__(_BoundedReader(reader, server.max_event_bytes), writer)  # type: ignore[arg-type]
        self.server = server
        self.stream: _Utterance | None = None
        self._utterances: set[_Utterance] = set()
        self._last: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            started = time.monotonic()
            await self.write_event((await self.server.info()).event())
            self.server.count("describe", None, started)
            return True
        if Synthesize.is_type(event.type):
            if self.stream is not None:
                return True  # the full text a streaming client also sends, for servers without streaming
            request = Synthesize.from_event(event)
            utterance = _Utterance(self, self.server.params(request.voice), "synthesize")
            if self._start(utterance):
                utterance.finish(request.text)  # one request: the service splits long text itself
            return True
        if SynthesizeStart.is_type(event.type):
            start = SynthesizeStart.from_event(event)
            self.stream = _Utterance(self, self.server.params(start.voice), "synthesize-stream")
            self._start(self.stream)
            return True
        if SynthesizeChunk.is_type(event.type):
            if self.stream is not None:
                self.stream.add_text(SynthesizeChunk.from_event(event).text)
            return True
        if SynthesizeStop.is_type(event.type):
            if self.stream is not None:
                self.stream.finish()
                self.stream = None
            return True
        return True  # other events (ping, select-program, ...): not ours, ignored as the protocol says

    def _start(self, utterance: _Utterance) -> bool:
        """Speak `utterance` after the ones before it; False (and an error event) when draining."""
        self._utterances.add(utterance)
        if self.server.gate.draining:
            error = Unavailable("the daemon is shutting down", reason="SHUTTING_DOWN")
            utterance.cancelled.set()
            task = asyncio.get_running_loop().create_task(
                self.write_event(Error(text=error.message, code=error.code.value).event()))
            self._keep(task)
            self._utterances.discard(utterance)
            return False
        previous = self._last

        async def run() -> None:
            if previous is not None:  # one utterance after the other on a connection
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await previous
            with self.server.gate.track():
                await utterance.speak()

        utterance.task = task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(lambda _: self._utterances.discard(utterance))
        self._last = task
        self._keep(task)
        return True

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(_quiet_done)
        task.add_done_callback(self._tasks.discard)

    async def disconnect(self) -> None:
        # EOF: stop what this client asked for (queued sentences leave the queue, a running
        # one stops at its next model step), unless it was only waiting to finish writing.
        for utterance in list(self._utterances):
            utterance.cancelled.set()
        for task in list(self._tasks):
            task.cancel()


def _quiet_done(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()


class WyomingServer:
    """Listen on `uri`; start() binds (StartupError on failure), then events go to `service`."""

    def __init__(self, service: ServiceLike, uri: str, *, allow_remote: bool = False,
                 max_event_bytes: int = 1 << 20, socket_mode: int = 0o660,
                 group_id: int | None = None) -> None:
        self.service: Any = service
        self.uri = uri
        self.kind, self.address, self.requested_port = parse_uri(uri, allow_remote)
        self.max_event_bytes = max_event_bytes
        self.socket_mode = socket_mode
        self.group_id = group_id
        self.port: int | None = None
        self.gate = DrainGate()
        self.metrics: Metrics | None = None
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._inode: tuple[int, int] | None = None

    @property
    def url(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.address}"
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"tcp://{host}:{self.port}"

    def use_metrics(self, metrics: Metrics) -> None:
        metrics.allow("wyoming", METHODS)
        self.metrics = metrics

    async def start(self) -> None:
        if self.kind == "tcp":
            try:
                self._server = await asyncio.start_server(self._on_connect, self.address, self.requested_port)
            except OSError as exc:
                raise StartupError(f"cannot listen for Wyoming on {self.uri}: {exc.strerror or exc}",
                                   exit_code=1) from None
            self.port = int(self._server.sockets[0].getsockname()[1])
        else:
            path = Path(self.address)
            if check_socket_path(path) and _is_live(path):
                raise StartupError(f"another server is listening on {path}; refusing to replace it")
            sock = bind_unix_socket(path, self.socket_mode, self.group_id)
            st = path.stat()
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(self._on_connect, sock=sock)
        log.info("Wyoming server at %s", self.url)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await _Handler(reader, writer, self).run()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        except Exception as exc:  # a bug here must not take the server down
            to_wire_error(exc, "wyoming connection")
        finally:
            self._handlers.discard(task)

    # ------------------------------------------------------------------ helpers for handlers
    async def info(self) -> Info:
        listing = (await self.service.presets_list())["presets"]
        voices = [
            TtsVoice(name=p["name"], attribution=ATTRIBUTION, installed=True, version=None,
                     description=f"{p['name']} (VALL-E X voice prompt, {p['language']})",
                     languages=[p["language"], *(x for x in LANGUAGES if x != p["language"])])
            for p in listing
        ]
        program = TtsProgram(name="vallexd", attribution=ATTRIBUTION, installed=True, version=__version__,
                             description="VALL-E X zero-shot speech synthesis (en, zh, ja)", voices=voices,
                             supports_synthesize_streaming=True)
        return Info(tts=[program])

    @staticmethod
    def params(voice: Any) -> dict[str, Any]:
        """Synthesize params for a Wyoming voice: the preset by name, the language if it is ours."""
        params: dict[str, Any] = {"language": "auto"}
        if voice is not None:
            if voice.name:
                params["voice"] = voice.name
            params["language"] = request_language(voice.language)
        return params

    def count(self, method: str, error: VallexError | None, started: float) -> None:
        if self.metrics is not None:
            self.metrics.request("wyoming", method, error)
        access_log.info("wyoming %s %.0fms %s", log_safe(method), (time.monotonic() - started) * 1000,
                        outcome(error))

    # ------------------------------------------------------------------ shutdown
    def stop_accepting(self) -> None:
        self.gate.draining = True
        if self._server is not None:
            self._server.close()

    async def wait_idle(self, timeout: float) -> bool:
        return await self.gate.wait_idle(timeout)

    async def close(self) -> None:
        self.stop_accepting()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        if self._inode is not None:  # remove our socket file, only if it is still ours
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.address)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.address)


def _is_live(path: Path) -> bool:
    """True if something accepts connections on the Unix socket `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
