"""The service core both transports call: request -> validation -> cache -> queue -> model -> WAV.

    synthesize: validate -> normalise the text (once) -> preset lookup
                -> model input already known for this text? -> cache key -> hit? return it
                -> text front end (its own thread) -> model input -> cache key -> hit? return it
                -> worker queue -> engine (retried if it made no audio) -> WAV -> cache -> result

Cache key. The key is built from the model input itself (the phoneme ids and token
languages of every piece, the prompt's digest, sampling, the engine identity), so two
requests share an entry exactly when the model reads the same thing, whatever the text
looked like; text_stage.py remembers each text's model input so hits skip the text thread.

Every failure is a `VallexError`.  Blocking work never runs on the event loop:
cache and preset file I/O go to the default executor, the text front end to a
single dedicated thread (OpenJTalk & co. are not known to be thread-safe), the
model to the worker's thread.

The daemon (vallexd.server.daemon) sets `static_base_url` once the static file server
child listens (results then carry a `url`), and `http_url` when the HTTP API runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vallexd import __version__
from vallexd.audio.encode import decode_wav_float, encode_audio
from vallexd.config import Config
from vallexd.constants import SAMPLE_RATE
from vallexd.errors import Busy, Internal, InvalidArgument, Unavailable, VallexError, deadline_error
from vallexd.protocol import PROTOCOL_VERSION
from vallexd.service.coalesce import Coalescer, Run
from vallexd.service.requests import SynthesisRequest, validate_empty, validate_synthesize
from vallexd.service.result import SynthesisResult
from vallexd.service.storage_api import StorageApi
from vallexd.service.stream import SynthesisStream
from vallexd.service.text_stage import TextStage, long_mode, model_input_digest, raise_if_cancelled, warm_text
from vallexd.service.voices import VoiceMaker
from vallexd.service.worker import AudioFn, ModelWorker, default_loader
from vallexd.storage.cache import cache_key, static_url
from vallexd.storage.presets import Preset
from vallexd.storage.wav import duration_s, wav_bytes, wav_duration_s
from vallexd.types import Piece, Sampling

log = logging.getLogger(__name__)

#: progress(done, total), called on the event loop as pieces finish; a plain function
#: (it must not block) or one returning an awaitable (awaited before the result is returned).
ProgressCallback = Callable[[int, int], Any]


@dataclass
class SynthesisRecord:
    """What one successful synthesize call did, for metrics (seconds; `started` is monotonic).

    first_audio_s: until the first audio reached the caller (None if no audio was delivered);
    model_s: text front end + queue + model of the run this request started (None for a cache
    hit or a request that joined another's run).
    """

    started: float
    cached: bool = False
    coalesced: bool = False
    total_s: float = 0.0
    first_audio_s: float | None = None
    model_s: float | None = None
    audio_s: float = 0.0


@dataclass
class _Made:
    """The shared outcome of one model run, or of a cache hit found after the text stage
    (see `Service._produce`)."""

    key: str
    data: bytes
    path: Path | None
    store_error: VallexError | None
    seconds: float
    pieces: int
    owner: SynthesisRecord  # the request that began the run
    work_s: float
    cached: bool = False
    timings: dict[str, float] = field(default_factory=dict)


#: How many times an unseeded synthesis that produced no audio is drawn again (a seeded one
#: would draw the same codes: it fails at once).
NO_AUDIO_ATTEMPTS = 3
def _no_audio(piece: int | None, attempts: int) -> Internal:
    where = f"piece {piece + 1}" if piece is not None else "the text"
    return Internal(
        f"the model produced no audio for {where} (it drew end-of-speech at once) in {attempts} "
        f"attempt{'s' if attempts > 1 else ''}; a shorter voice prompt, another seed or other text may help",
        reason="NO_AUDIO", details={"attempts": attempts, **({"piece": piece} if piece is not None else {})},
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


class Service(StorageApi):
    """The model's requests (synthesize, presets.create, status) over StorageApi's presets and cache."""

    def __init__(self, config: Config, *, worker: ModelWorker | None = None, warm_up: bool = True,
                 shared: bool = False) -> None:
        """`worker` replaces the model worker built from `config` (tests pass one on tiny weights);
        `warm_up` loads the text front end's dictionaries in the background at start; `shared`: other
        processes use the same cache and presets folders (Ray replicas; see storage_api.py)."""
        super().__init__(config, shared=shared)
        if worker is None:
            if config.checkpoint is None or config.vocos_dir is None:
                raise InvalidArgument("no model configured: set checkpoint and vocos", reason="BAD_CONFIG")
            loader = default_loader(config.checkpoint, config.vocos_dir, config.device, config.dtype,
                                    config.threads, config.compile, config.quantize)
            worker = ModelWorker(loader, queue_limit=config.queue_limit, max_batch=config.max_batch,
                                 nar_thread=config.nar_thread)
        self.worker = worker
        #: Set by the lifecycle once the static server child listens, e.g. "http://127.0.0.1:8080".
        self.static_base_url: str | None = None
        #: Set by the lifecycle when the HTTP API listens.
        self.http_url: str | None = None
        self.text = TextStage(config)
        self.voices = VoiceMaker(config, self.presets, self.text.executor)
        self._warm_up = warm_up
        self._state = "new"  # -> "loading" in start() -> "running" -> "draining" once drain() begins
        self._active = 0  # synthesize calls in progress (any stage)
        self._quiet = asyncio.Event()  # set whenever _active drops to 0
        self._preparing = 0  # cache misses admitted but not yet handed to the worker (text stage)
        self._started_at = time.monotonic()
        self.counters = {"synthesize": 0, "cache_hits": 0, "cache_misses": 0, "errors": 0,
                         "no_audio_retries": 0}
        self._coalescer: Coalescer[_Made] = Coalescer()
        #: Metrics hook: called with each successful synthesize call's SynthesisRecord.
        self.on_record: Callable[[SynthesisRecord], None] | None = None

    @property
    def active(self) -> int:
        """Synthesis requests in progress, in any stage."""
        return self._active

    @property
    def coalesced(self) -> int:
        """Cache misses that joined an identical request's model run."""
        return self._coalescer.joined

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Index presets and load the model; raises Unavailable(MODEL_LOAD_FAILED) if it cannot."""
        self._state = "loading"
        await self.rescan_presets()
        await self.worker.start()
        self._state = "running"
        if self._warm_up:
            # Load jieba/OpenJTalk/CMU dict in the text thread in the background: readiness does
            # not wait for it, and a first request simply queues behind it in that thread.
            asyncio.get_running_loop().run_in_executor(self.text.executor, warm_text)

    async def drain(self, grace_s: float) -> None:
        """Stop accepting work; let accepted requests finish within `grace_s`, then cut off the rest.

        Waits for whole requests, not just model jobs: one still in the text front end when the
        signal came has been accepted too and must not be refused halfway.
        """
        self._state = "draining"
        deadline = time.monotonic() + max(grace_s, 0.0)
        while self._active and time.monotonic() < deadline:
            self._quiet.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), timeout=deadline - time.monotonic())
        await self.worker.stop(max(deadline - time.monotonic(), 0.0))
        self.voices.shutdown()
        self.text.executor.shutdown(wait=False, cancel_futures=True)

    def _check_accepting(self) -> None:
        if self._state == "draining":
            raise Unavailable("the daemon is shutting down", reason="SHUTTING_DOWN")
        if self._state == "loading":
            raise Unavailable("the model is still loading; retry when `status` says ready",
                              reason="MODEL_LOADING")
        if self._state != "running":
            raise Unavailable("the model is not loaded", reason="MODEL_NOT_LOADED")

    @property
    def state(self) -> str:
        """"loading" (listening, model not in yet), "ready", or "draining" (shutting down)."""
        return {"running": "ready", "draining": "draining"}.get(self._state, "loading")

    # ------------------------------------------------------------------ synthesize
    async def synthesize(
        self,
        params: dict[str, Any],
        *,
        progress: ProgressCallback | None = None,
        cancelled: asyncio.Event | None = None,
        on_audio: AudioFn | None = None,
    ) -> SynthesisResult:
        """Validate `params` (docs/protocol.md), then answer from the cache or run the model.

        progress(done, total) is called on the loop as pieces finish when `params["progress"]`
        is true; setting `cancelled` drops the job if queued, or stops it at the next AR step.
        on_audio(samples) is called on the loop with float32 mono audio at `sample_rate` as it is
        made: each piece of a miss as soon as it is vocoded (all of it before this returns), or a
        cache hit's whole audio at once; the result then carries no audio bytes (the caller has
        them; see `synthesize_stream`).  Concurrent misses with the same cache key share one
        model run (see coalesce.py).
        Raises VallexError: InvalidArgument / NotFound / TooLarge for the request, Busy
        (QUEUE_FULL), Timeout (DEADLINE, CANCELLED), Unavailable (draining, model not loaded,
        cache not writable for `return: path`).
        """
        record = SynthesisRecord(started=time.monotonic())
        self.counters["synthesize"] += 1
        self._active += 1
        try:
            result = await self._synthesize(params, record, progress, cancelled, on_audio)
        except Exception:  # VallexError or a bug (the transport turns the latter into INTERNAL)
            self.counters["errors"] += 1
            raise
        finally:
            self._active -= 1
            if not self._active:
                self._quiet.set()
        record.total_s = time.monotonic() - record.started
        record.audio_s = result.duration_s
        if self.on_record is not None:
            try:
                self.on_record(record)
            except Exception:  # metrics must never fail a request
                log.exception("on_record hook failed")
        return result

    def synthesize_stream(self, params: dict[str, Any], *, progress: ProgressCallback | None = None,
                          cancelled: asyncio.Event | None = None) -> SynthesisStream:
        """A synthesis whose audio is iterated piece by piece (see `SynthesisStream`).

        The params are validated now (InvalidArgument / TooLarge raised before any work); the
        synthesis starts when the stream is entered with `async with`.
        """
        req = validate_synthesize(params, max_text_chars=self.config.max_text_chars)
        return SynthesisStream(self, params, req, progress=progress, cancelled=cancelled,
                               sample_rate=self._sample_rate())

    async def _synthesize(self, params: Any, record: SynthesisRecord, progress: ProgressCallback | None,
                          cancelled: asyncio.Event | None, on_audio: AudioFn | None) -> SynthesisResult:
        started = record.started
        self._check_accepting()
        raise_if_cancelled(cancelled)
        req = self.text.normalised(validate_synthesize(params, max_text_chars=self.config.max_text_chars))
        if req.voice is not None:
            await self.refresh_presets()
        preset = self.presets.get(req.voice) if req.voice is not None else None
        text_key = self.text.digest(req)
        known = self.text.known(text_key)
        if known is not None and not req.fresh:
            # Fast path: this text was read before, so its model input (and cache key) is known.
            hit = await self._hit(req, self._cache_key(req, preset, known), record, on_audio)
            if hit is not None:
                return hit

        self.counters["cache_misses"] += 1

        def deliver(samples: np.ndarray) -> None:
            if record.first_audio_s is None:
                record.first_audio_s = time.monotonic() - started
            if on_audio is not None:
                on_audio(samples)

        pending: list[asyncio.Future[Any]] = []
        # Identical concurrent requests (same text key, voice and sampling) share one run.
        run_key = self._cache_key(req, preset, f"text:{text_key}")
        made = await self._coalescer.run(
            run_key, lambda run: self._produce(req, preset, text_key, known, record, run),
            cancelled=cancelled, on_audio=deliver, progress=self._reporter(req, progress, pending))
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        record.coalesced = made.owner is not record
        record.model_s = None if record.coalesced or made.cached else made.work_s
        record.cached = made.cached
        if made.path is None and req.return_mode != "audio":
            assert made.store_error is not None
            raise made.store_error
        if made.cached:
            self.counters["cache_hits"] += 1
        result = await self._result(req, made.key, made.data, made.path, made.seconds, cached=made.cached,
                                    pieces=made.pieces, started=started, streamed=on_audio is not None)
        result.timings.update(made.timings)
        return result

    @staticmethod
    def _reporter(req: SynthesisRequest, progress: ProgressCallback | None,
                  pending: list[asyncio.Future[Any]]) -> Callable[[int, int], None] | None:
        """This request's progress callback; awaitables it returns are collected in `pending`."""
        if not (req.progress and progress is not None):
            return None

        def report(done: int, total: int) -> None:
            outcome = progress(done, total)
            if inspect.isawaitable(outcome):
                pending.append(asyncio.ensure_future(outcome))

        return report

    async def _produce(self, req: SynthesisRequest, preset: Preset | None, text_key: str, known: str | None,
                       owner: SynthesisRecord, run: Run) -> _Made:
        """The text stage and model part of a miss, shared by every identical request meanwhile."""
        started = owner.started
        pieces = await self._prepare(req, started, run.cancelled)
        text_done = time.monotonic()
        digest = model_input_digest(pieces)
        self.text.remember(text_key, digest)
        key = self._cache_key(req, preset, digest)
        rate = self._sample_rate()
        if not req.fresh and digest != known:  # another spelling of a text already spoken
            hit = await asyncio.to_thread(self._read_hit, key, True)
            if hit is not None:
                data, path, seconds = hit
                assert data is not None
                run.emit_audio(await asyncio.to_thread(decode_wav_float, data))
                return _Made(key=key, data=data, path=path, store_error=None, seconds=seconds, pieces=0,
                             owner=owner, work_s=0.0, cached=True)
        audio = await self._run_model_until_audio(req, preset, pieces, started, run)
        model_done = time.monotonic()
        data = await asyncio.to_thread(wav_bytes, audio, rate)
        path, store_error = await self._store(key, data)
        return _Made(key=key, data=data, path=path, store_error=store_error,
                     seconds=duration_s(len(audio), rate), pieces=len(pieces), owner=owner,
                     work_s=model_done - started,
                     timings={"text_ms": _ms(text_done - started), "model_ms": _ms(model_done - text_done)})

    def _cache_key(self, req: SynthesisRequest, preset: Preset | None, model_input: str) -> str:
        """The one place the cache key's fields are listed: add a field here when something
        new changes the audio. Output format and speed do not: the cache keeps the WAV."""
        return cache_key(
            engine_identity=self.worker.identity,
            preset_digest=preset.digest if preset is not None else None,
            model_input=model_input,
            # the pieces of one text depend on each other in sliding mode
            long_mode="whole" if req.long is False else long_mode(req),
            top_k=int(req.top_k), temperature=float(req.temperature), seed=req.seed,
        )

    async def _hit(self, req: SynthesisRequest, key: str, record: SynthesisRecord,
                   on_audio: AudioFn | None) -> SynthesisResult | None:
        """The cached result for `key` (its audio handed to on_audio), or None on a miss."""
        want_audio = req.return_mode == "audio"
        # A hit that is streamed needs its bytes even for `return: path`.
        hit = await asyncio.to_thread(self._read_hit, key, want_audio or on_audio is not None)
        if hit is None:
            return None
        self.counters["cache_hits"] += 1
        record.cached = True
        data, path, seconds = hit
        if on_audio is not None and data is not None:
            on_audio(await asyncio.to_thread(decode_wav_float, data))
        record.first_audio_s = time.monotonic() - record.started
        return await self._result(req, key, data, path, seconds, cached=True, pieces=0,
                                  started=record.started, streamed=on_audio is not None)

    async def _run_model_until_audio(self, req: SynthesisRequest, preset: Preset | None,
                                     pieces: list[Piece], started: float, run: Run) -> np.ndarray:
        """`_run_model`, drawn again when a piece (or the whole) came back without audio.

        Zero frames is never a success nor a cache entry: an unseeded request is drawn up to
        NO_AUDIO_ATTEMPTS times (a fresh draw may speak), a seeded one would draw the same
        codes and fails at once; then Internal(NO_AUDIO) (HTTP 500) saying what happened.
        """
        attempts = 1 if req.seed is not None else NO_AUDIO_ATTEMPTS
        piece: int | None = None
        for attempt in range(1, attempts + 1):
            try:
                audio = await self._run_model(preset, pieces, req, started, run)
            except VallexError as exc:
                if exc.reason != "NO_AUDIO":
                    raise
                piece = exc.details.get("piece") if isinstance(exc.details.get("piece"), int) else None
            else:
                if len(audio):
                    return audio
                piece = None
            log.warning("synthesis produced no audio (%s), attempt %d of %d",
                        f"piece {piece + 1}" if piece is not None else "whole text", attempt, attempts)
            if attempt < attempts:
                self.counters["no_audio_retries"] += 1
        raise _no_audio(piece, attempts)

    async def _prepare(self, req: SynthesisRequest, started: float,
                       cancelled: asyncio.Event | None) -> list[Piece]:
        """Admission, then the text front end in its own thread: the request's model pieces."""
        # A miss counts against the queue limit from here on, not only once it reaches the
        # worker; otherwise any number of requests could pile up in the text stage.
        queue_limit = self.worker.queue_limit
        capacity = queue_limit + self.worker.max_batch  # waiting + rows of the batch
        if self._preparing + self.worker.queue_depth + self.worker.in_flight >= capacity:
            raise Busy(f"the queue is full ({queue_limit} waiting); retry later", reason="QUEUE_FULL",
                       details={"queue_limit": queue_limit})
        deadline = started + self.config.request_timeout_s
        self._preparing += 1
        try:
            pieces = await asyncio.get_running_loop().run_in_executor(
                self.text.executor, self.text.pieces, req, deadline, cancelled)
        finally:
            self._preparing -= 1
        raise_if_cancelled(cancelled)
        return pieces

    async def _run_model(self, preset: Preset | None, pieces: list[Piece], req: SynthesisRequest,
                         started: float, run: Run) -> np.ndarray:
        """Queue the pieces on the worker; audio and progress go to every waiter of `run`."""
        remaining = self.config.request_timeout_s - (time.monotonic() - started)
        if remaining <= 0:
            raise deadline_error(self.config.request_timeout_s)
        return await self.worker.run(
            pieces, preset.prompt if preset is not None else None,
            Sampling(top_k=req.top_k, temperature=req.temperature, seed=req.seed),
            timeout_s=remaining, progress=run.emit_progress, cancelled=run.cancelled,
            on_audio=run.emit_audio, long_mode=long_mode(req),
        )

    async def _store(self, key: str, data: bytes) -> tuple[Path | None, VallexError | None]:
        """Write the WAV into the cache: (path, None), or (None, the error) when it cannot.

        A full or read-only cache must not throw away audio a client asked to receive: such a
        request gets its bytes without a path; for `return: path` the error is raised. Whatever
        the cause (full, read-only, no permission), it is the server's storage: 503 UNAVAILABLE,
        never a 403 the client could do nothing about.
        """
        try:
            return await asyncio.to_thread(self.cache.put, key, data), None
        except (OSError, VallexError) as exc:
            log.warning("cache: cannot store %s: %s", key[:12], exc)
            if isinstance(exc, Unavailable):
                return None, exc
            detail = exc.message if isinstance(exc, VallexError) else (exc.strerror or str(exc))
            return None, Unavailable(f"cannot write the result to the cache: {detail}",
                                     reason="CACHE_WRITE_FAILED")

    def _sample_rate(self) -> int:
        engine = self.worker.engine
        return int(engine.sample_rate) if engine is not None else SAMPLE_RATE

    def _read_hit(self, key: str, want_audio: bool) -> tuple[bytes | None, Path, float] | None:
        """Blocking: (bytes or None, path, duration) of a cached entry, or None on a miss."""
        if want_audio:
            data = self.cache.get(key)
            if data is None:
                return None
            path = self.cache.path(key)
            try:
                seconds = wav_duration_s(data)
            except ValueError:
                log.warning("cache: ignoring damaged entry %s", path.name)
                return None  # damaged: regenerate (and replace it)
            return data, path, seconds
        path = self.cache.lookup(key)
        if path is None:
            return None
        try:
            with wave.open(str(path), "rb") as wav:
                seconds = duration_s(wav.getnframes(), wav.getframerate())
        except (OSError, wave.Error, EOFError):
            return None  # vanished or damaged: regenerate
        return None, path, seconds

    async def _result(self, req: SynthesisRequest, key: str, data: bytes | None, path: Path | None,
                      seconds: float, *, cached: bool, pieces: int, started: float,
                      streamed: bool) -> SynthesisResult:
        """The result; its audio is the WAV `data` encoded to the request's format and speed
        (None for `return: path`, or when the audio was streamed through on_audio)."""
        url = None
        if self.static_base_url and path is not None:
            url = static_url(self.static_base_url, key)
        rate = self._sample_rate()
        audio = data if req.return_mode == "audio" and not streamed else None
        if audio is not None and (req.format != "wav" or req.speed != 1.0):
            wav, fmt, speed = audio, req.format, req.speed
            audio = await asyncio.to_thread(
                lambda: encode_audio(decode_wav_float(wav), fmt, rate, speed=speed))
        return SynthesisResult(
            cache_key=key, duration_s=round(seconds / req.speed, 3), sample_rate=rate, cached=cached,
            pieces=pieces, path=path, url=url, audio=audio, format=req.format,
            timings={"total_ms": _ms(time.monotonic() - started)},
        )

    # ------------------------------------------------------------------ status
    def health(self) -> dict[str, Any]:
        """{"version", "model_loaded", "model_identity", "draining"}: no I/O, for probes."""
        engine = self.worker.engine
        return {
            "version": __version__,
            "model_loaded": engine is not None,
            "model_identity": str(engine.identity) if engine is not None else None,
            "draining": self._state == "draining",
        }

    async def status(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The `status` map of docs/protocol.md (scans the cache folder for its size)."""
        validate_empty(params)
        cache = await asyncio.to_thread(self.cache.stats)
        engine = self.worker.engine
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "device": str(engine.device) if engine is not None else self.config.device,
            "dtype": str(engine.dtype) if engine is not None else self.config.dtype,
            # int8 weight matmuls (--quantize): none | nar | all
            "quantize": str(getattr(engine, "quantize", "none")) if engine else self.config.quantize,
            "threads": engine.threads if engine is not None else self.config.threads,
            "state": self.state,
            # GPU name, capability, memory (total; allocated/reserved now), driver; None until loaded.
            "device_info": getattr(engine, "device_info", None),
            "model_loaded": engine is not None,
            "model_identity": str(engine.identity) if engine is not None else None,
            "checkpoint": str(self.config.checkpoint) if self.config.checkpoint else None,
            "queue_depth": self.worker.queue_depth,
            "queue_limit": self.worker.queue_limit,
            "in_flight": self.worker.in_flight,
            "max_batch": self.worker.max_batch,
            "batch_size": self.worker.batch_size,
            "nar_thread": self.worker.nar_thread,  # None until the model is loaded
            "cache": {"files": cache["files"], "bytes": cache["bytes"]},
            "presets": len(self.presets),
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "static_url": self.static_base_url,
            "http_url": self.http_url,
            "pid": os.getpid(),
            "counters": {**self.counters, "engine_runs": self.worker.jobs_run,
                         "engine_failures": self.worker.jobs_failed, "coalesced": self._coalescer.joined},
            "voices": self.voices.status(),
        }

    # ------------------------------------------------------------------ presets
    async def presets_create(self, params: dict[str, Any]) -> dict[str, Any]:
        """A voice from a recording (vallexd.service.voices): its presets.list entry + transcript."""
        self._check_accepting()
        self._active += 1  # drain waits for it like for a synthesis
        try:
            await self.refresh_presets()
            return await self.voices.create(params)
        finally:
            self._active -= 1
            if not self._active:
                self._quiet.set()
