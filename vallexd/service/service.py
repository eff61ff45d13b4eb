"""The service core both transports call: request -> validation -> cache -> queue -> model -> WAV.

    synthesize: validate -> normalise the text (once) -> preset lookup
                -> model input already known for this text? -> cache key -> hit? return it
                -> text front end (its own thread) -> model input -> cache key -> hit? return it
                -> worker queue -> engine (retried if it made no audio) -> WAV -> cache -> result

Cache key. The key is built from the model input itself (the phoneme ids and token
languages of every piece, the prompt's digest, sampling, the engine identity), so two
requests share an entry exactly when the model reads the same thing, whatever the text
looked like. To keep hits off the text thread, the digest of the model input is remembered
(in memory, bounded) per normalised text + language + accent + long mode + budget: the
front end is deterministic in those within one process, so the remembered digest is the one
the front end would produce again. After a restart, the first request of a text runs the
front end once, then finds its entry.

Every failure is a `VallexError`.  Blocking work never runs on the event loop:
cache and preset file I/O go to the default executor, the text front end to a
single dedicated thread (OpenJTalk & co. are not known to be thread-safe), the
model to the worker's thread.

The transports (vallexd.server.rpc / vallexd.server.http_api) fill in `static_base_url`
once the static file server child is up (and `http_url` if the HTTP API runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import time
import wave
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from vallexd import __version__
from vallexd.config import Config
from vallexd.constants import SAMPLE_RATE
from vallexd.errors import Busy, Internal, InvalidArgument, Timeout, Unavailable, VallexError
from vallexd.protocol import PROTOCOL_VERSION
from vallexd.service.requests import (
    SynthesisRequest,
    validate_empty,
    validate_install,
    validate_prune,
    validate_remove,
    validate_synthesize,
)
from vallexd.service.result import SynthesisResult
from vallexd.service.worker import ModelWorker, default_loader
from vallexd.storage.cache import ResultCache, cache_key, relative_url_path
from vallexd.storage.presets import Preset, PresetStore
from vallexd.storage.wav import duration_s, wav_bytes, wav_duration_s
from vallexd.types import Piece, Sampling

log = logging.getLogger(__name__)

#: progress(done, total), called on the event loop as pieces finish; a plain function
#: (it must not block) or one returning an awaitable (awaited before the result is returned).
ProgressCallback = Callable[[int, int], Any]


def _warm_text() -> None:
    try:
        from vallexd import text as frontend

        spent = frontend.warm_up()
        log.info("text front end ready (%s)", ", ".join(f"{k} {v:.1f}s" for k, v in spent.items()))
    except Exception:  # a front end that cannot warm up will report properly on first use
        log.warning("text front end warm-up failed", exc_info=True)


#: How many times an unseeded synthesis that produced no audio is drawn again (a seeded one
#: would draw the same codes: it fails at once).
NO_AUDIO_ATTEMPTS = 3
#: Remembered text -> model-input digests (about 200 bytes each).
MODEL_INPUT_MEMO = 16384


def model_input_digest(pieces: list[Piece]) -> str:
    """sha256 hex of what the model reads: every piece's phoneme ids and token language(s)."""
    doc = [[[int(i) for i in ids], langs if isinstance(langs, str) else list(langs)] for ids, langs in pieces]
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def _no_audio(piece: int | None, attempts: int) -> Internal:
    where = f"piece {piece + 1}" if piece is not None else "the text"
    return Internal(
        f"the model produced no audio for {where} (it drew end-of-speech at once) in {attempts} "
        f"attempt{'s' if attempts > 1 else ''}; a shorter voice prompt, another seed or other text may help",
        reason="NO_AUDIO", details={"attempts": attempts, **({"piece": piece} if piece is not None else {})},
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _raise_if_cancelled(cancelled: asyncio.Event | None) -> None:
    if cancelled is not None and cancelled.is_set():
        raise Timeout("request cancelled: the client went away", reason="CANCELLED")


class Service:
    def __init__(self, config: Config, *, worker: ModelWorker | None = None, warm_up: bool = True) -> None:
        self.config = config
        self.cache = ResultCache(config.cache_dir)
        self.presets = PresetStore(config.presets_dirs, max_bytes=config.max_upload_bytes)
        if worker is None:
            if config.checkpoint is None or config.vocos_dir is None:
                raise InvalidArgument("no model configured: set checkpoint and vocos", reason="BAD_CONFIG")
            loader = default_loader(config.checkpoint, config.vocos_dir, config.device, config.dtype,
                                    config.threads)
            worker = ModelWorker(loader, queue_limit=config.queue_limit)
        self.worker = worker
        #: Set by the lifecycle once the static server child listens, e.g. "http://127.0.0.1:8080".
        self.static_base_url: str | None = None
        #: Set by the lifecycle when the HTTP API listens.
        self.http_url: str | None = None
        self._text_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vallexd-text")
        self._warm_up = warm_up
        self._state = "new"  # -> "running" after start() -> "draining" once drain() begins
        self._active = 0  # synthesize calls in progress (any stage)
        self._quiet = asyncio.Event()  # set whenever _active drops to 0
        self._preparing = 0  # cache misses admitted but not yet handed to the worker (text stage)
        self._started_at = time.monotonic()
        self.counters = {"synthesize": 0, "cache_hits": 0, "errors": 0, "no_audio_retries": 0}
        self._model_inputs: OrderedDict[str, str] = OrderedDict()  # text digest -> model input digest

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Index presets and load the model; raises Unavailable(MODEL_LOAD_FAILED) if it cannot."""
        await asyncio.to_thread(self.presets.rescan)
        await self.worker.start()
        self._state = "running"
        if self._warm_up:
            # Load jieba/OpenJTalk/CMU dict in the text thread in the background: readiness does
            # not wait for it, and a first request simply queues behind it in that thread.
            asyncio.get_running_loop().run_in_executor(self._text_executor, _warm_text)

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
        self._text_executor.shutdown(wait=False, cancel_futures=True)

    def _check_accepting(self) -> None:
        if self._state == "draining":
            raise Unavailable("the daemon is shutting down", reason="SHUTTING_DOWN")
        if self._state != "running":
            raise Unavailable("the model is not loaded", reason="MODEL_NOT_LOADED")

    # ------------------------------------------------------------------ synthesize
    async def synthesize(
        self,
        params: dict[str, Any],
        *,
        progress: ProgressCallback | None = None,
        cancelled: asyncio.Event | None = None,
    ) -> SynthesisResult:
        """Validate `params` (docs/protocol.md), then answer from the cache or run the model.

        progress(done, total) is called on the loop as pieces finish when `params["progress"]`
        is true; setting `cancelled` drops the job if queued, or stops it at the next AR step.
        Raises VallexError: InvalidArgument / NotFound / TooLarge for the request, Busy
        (QUEUE_FULL), Timeout (DEADLINE, CANCELLED), Unavailable (draining, model not loaded,
        cache not writable for `return: path`).
        """
        started = time.monotonic()
        self.counters["synthesize"] += 1
        self._active += 1
        try:
            return await self._synthesize(params, started, progress, cancelled)
        except Exception:  # VallexError or a bug (the transport turns the latter into INTERNAL)
            self.counters["errors"] += 1
            raise
        finally:
            self._active -= 1
            if not self._active:
                self._quiet.set()

    async def _synthesize(self, params: Any, started: float, progress: ProgressCallback | None,
                          cancelled: asyncio.Event | None) -> SynthesisResult:
        self._check_accepting()
        _raise_if_cancelled(cancelled)
        req = self._normalised(validate_synthesize(params, max_text_chars=self.config.max_text_chars))
        preset = self.presets.get(req.voice) if req.voice is not None else None
        want_audio = req.return_mode == "audio"
        text_key = self._text_digest(req)
        known = self._model_inputs.get(text_key)
        if known is not None and not req.fresh:
            self._model_inputs.move_to_end(text_key)
            hit = await self._hit(self._cache_key(req, preset, known), want_audio, started)
            if hit is not None:
                return hit

        pieces = await self._prepare(req, started, cancelled)
        text_done = time.monotonic()
        digest = model_input_digest(pieces)
        self._remember(text_key, digest)
        key = self._cache_key(req, preset, digest)
        if not req.fresh and digest != known:  # another spelling of a text already spoken
            hit = await self._hit(key, want_audio, started)
            if hit is not None:
                return hit
        audio = await self._run_model_until_audio(req, preset, pieces, started, progress, cancelled)
        model_done = time.monotonic()
        rate = self._sample_rate()
        data = await asyncio.to_thread(wav_bytes, audio, rate)
        path = await self._store(key, data, want_audio)
        result = self._result(key, data if want_audio else None, path, duration_s(len(audio), rate),
                              cached=False, pieces=len(pieces), started=started)
        result.timings.update(text_ms=_ms(text_done - started), model_ms=_ms(model_done - text_done))
        return result

    @staticmethod
    def _normalised(req: SynthesisRequest) -> SynthesisRequest:
        """The request with its text in the one canonical form both the key and the front end see."""
        from vallexd.text.normalize import normalize_text

        text = normalize_text(req.text)
        if not text:
            raise InvalidArgument("text is empty", reason="EMPTY_TEXT", details={"field": "text"})
        return dataclasses.replace(req, text=text)

    def _text_digest(self, req: SynthesisRequest) -> str:
        """What determines the model input besides the front end's code: normalised text,
        language, accent, long mode and the phoneme budget (the memo's key)."""
        doc = [req.text, req.language, req.accent,
               # true and "auto" split alike; the split depends on the phoneme budget
               "whole" if req.long is False else f"split:{self._split_budget()}"]
        return hashlib.sha256(json.dumps(doc, ensure_ascii=False).encode()).hexdigest()

    def _remember(self, text_key: str, digest: str) -> None:
        self._model_inputs[text_key] = digest
        self._model_inputs.move_to_end(text_key)
        while len(self._model_inputs) > MODEL_INPUT_MEMO:
            self._model_inputs.popitem(last=False)

    def _cache_key(self, req: SynthesisRequest, preset: Preset | None, model_input: str) -> str:
        """The one place the cache key's fields are listed: add a field here when something
        new changes the audio (e.g. an output format)."""
        return cache_key(
            engine_identity=self.worker.identity,
            preset_digest=preset.digest if preset is not None else None,
            model_input=model_input,
            top_k=int(req.top_k), temperature=float(req.temperature), seed=req.seed,
        )

    async def _hit(self, key: str, want_audio: bool, started: float) -> SynthesisResult | None:
        hit = await asyncio.to_thread(self._read_hit, key, want_audio)
        if hit is None:
            return None
        self.counters["cache_hits"] += 1
        data, path, seconds = hit
        return self._result(key, data, path, seconds, cached=True, pieces=0, started=started)

    async def _run_model_until_audio(self, req: SynthesisRequest, preset: Preset | None, pieces: list[Piece],
                                     started: float, progress: ProgressCallback | None,
                                     cancelled: asyncio.Event | None) -> np.ndarray:
        """`_run_model`, drawn again when a piece (or the whole) came back without audio.

        Zero frames is never a success nor a cache entry: an unseeded request is drawn up to
        NO_AUDIO_ATTEMPTS times (a fresh draw may speak), a seeded one would draw the same
        codes and fails at once; then Internal(NO_AUDIO) (HTTP 500) saying what happened.
        """
        attempts = 1 if req.seed is not None else NO_AUDIO_ATTEMPTS
        piece: int | None = None
        for attempt in range(1, attempts + 1):
            try:
                audio = await self._run_model(req, preset, pieces, started, progress, cancelled)
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
        if self._preparing + self.worker.queue_depth + self.worker.in_flight >= queue_limit + 1:
            raise Busy(f"the queue is full ({queue_limit} waiting); retry later", reason="QUEUE_FULL",
                       details={"queue_limit": queue_limit})
        deadline = started + self.config.request_timeout_s
        self._preparing += 1
        try:
            pieces = await asyncio.get_running_loop().run_in_executor(
                self._text_executor, self._prepare_text, req, deadline, cancelled)
        finally:
            self._preparing -= 1
        _raise_if_cancelled(cancelled)
        return pieces

    async def _run_model(self, req: SynthesisRequest, preset: Preset | None, pieces: list[Piece],
                         started: float, progress: ProgressCallback | None,
                         cancelled: asyncio.Event | None) -> np.ndarray:
        """Queue the pieces on the worker; progress events go out before this returns."""
        pending: list[asyncio.Future[Any]] = []
        report = None
        if req.progress and progress is not None:
            def report(done: int, total: int) -> None:
                outcome = progress(done, total)
                if inspect.isawaitable(outcome):
                    pending.append(asyncio.ensure_future(outcome))

        remaining = self.config.request_timeout_s - (time.monotonic() - started)
        if remaining <= 0:
            raise self._deadline_error()
        audio = await self.worker.run(
            pieces, preset.prompt if preset is not None else None,
            Sampling(top_k=req.top_k, temperature=req.temperature, seed=req.seed),
            timeout_s=remaining, progress=report, cancelled=cancelled,
        )
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return audio

    async def _store(self, key: str, data: bytes, want_audio: bool) -> Path | None:
        """Write the WAV into the cache. A full or read-only cache must not throw away audio the
        client asked to receive: then the result has no path; for `return: path` it is an error."""
        try:
            return await asyncio.to_thread(self.cache.put, key, data)
        except (OSError, VallexError) as exc:
            log.warning("cache: cannot store %s: %s", key[:12], exc)
            if want_audio:
                return None
            # Whatever the cause (full, read-only, no permission), it is the server's storage:
            # 503 UNAVAILABLE, never a 403 the client could do nothing about.
            if isinstance(exc, Unavailable):
                raise
            detail = exc.message if isinstance(exc, VallexError) else (exc.strerror or str(exc))
            raise Unavailable(f"cannot write the result to the cache: {detail}",
                              reason="CACHE_WRITE_FAILED") from None

    def _deadline_error(self) -> Timeout:
        timeout_s = self.config.request_timeout_s
        return Timeout(f"request ran past its deadline of {timeout_s:g} s", reason="DEADLINE",
                       details={"timeout_s": timeout_s})

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

    def _split_budget(self) -> int:
        """The effective phoneme budget per piece for long text (part of the cache key)."""
        from vallexd.text import DEFAULT_PHONEME_BUDGET

        return int(self.config.long_budget or DEFAULT_PHONEME_BUDGET)

    def _prepare_text(self, req: SynthesisRequest, deadline: float,
                      cancelled: asyncio.Event | None) -> list[Piece]:
        """Blocking, in the text thread: split (long mode) and phonemize into engine pieces."""
        from vallexd import text as frontend

        # The request may have waited for this thread: do not phonemize for nobody.
        _raise_if_cancelled(cancelled)
        if time.monotonic() >= deadline:
            raise self._deadline_error()
        budget = self._split_budget()
        language = req.language
        if language == "auto":
            # Resolve once for the whole text so every piece speaks the same language.
            language = frontend.detect_language(req.text)
        max_chars = self.config.max_text_chars
        # split_text packs sentences greedily up to the budget, so a short text stays one
        # piece: "auto" and true behave the same (true is the old API's `longprompt`).
        texts = [req.text] if req.long is False else frontend.split_text(req.text, language, budget=budget)
        pieces: list[Piece] = []
        empty: VallexError | None = None
        for piece_text in texts:
            try:
                ph = frontend.phonemize(piece_text, language, max_chars=max_chars)
            except InvalidArgument as exc:
                if exc.reason != "EMPTY_TEXT":
                    raise
                empty = exc  # a piece of punctuation only: nothing to say, skip it
                continue
            pieces.append((ph.ids, frontend.token_languages(ph, req.accent)))
        if not pieces:
            raise empty or InvalidArgument("text is empty", reason="EMPTY_TEXT", details={"field": "text"})
        return pieces

    def _result(self, key: str, data: bytes | None, path: Path | None, seconds: float, *, cached: bool,
                pieces: int, started: float) -> SynthesisResult:
        url = None
        if self.static_base_url and path is not None:
            url = f"{self.static_base_url.rstrip('/')}/{relative_url_path(key)}"
        return SynthesisResult(
            cache_key=key, duration_s=round(seconds, 3), sample_rate=self._sample_rate(), cached=cached,
            pieces=pieces, path=path, url=url, audio=data,
            timings={"total_ms": _ms(time.monotonic() - started)},
        )

    # ------------------------------------------------------------------ status
    def health(self) -> dict[str, Any]:
        """Liveness for /health: model loaded and not draining; cheap (no cache scan, no I/O)."""
        engine = self.worker.engine
        return {
            "version": __version__,
            "model_loaded": engine is not None,
            "model_identity": str(engine.identity) if engine is not None else None,
            "draining": self._state == "draining",
        }

    async def status(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        validate_empty(params)
        cache = await asyncio.to_thread(self.cache.stats)
        engine = self.worker.engine
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "device": str(engine.device) if engine is not None else self.config.device,
            "dtype": str(engine.dtype) if engine is not None else self.config.dtype,
            "threads": engine.threads if engine is not None else self.config.threads,
            "model_loaded": engine is not None,
            "model_identity": str(engine.identity) if engine is not None else None,
            "queue_depth": self.worker.queue_depth,
            "queue_limit": self.worker.queue_limit,
            "in_flight": self.worker.in_flight,
            "cache": {"files": cache["files"], "bytes": cache["bytes"]},
            "presets": len(self.presets),
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "static_url": self.static_base_url,
            "http_url": self.http_url,
            "pid": os.getpid(),
            "counters": {**self.counters, "engine_runs": self.worker.jobs_run,
                         "engine_failures": self.worker.jobs_failed},
        }

    # ------------------------------------------------------------------ presets
    async def presets_list(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        validate_empty(params)
        return {"presets": self.presets.listing()}

    async def presets_install(self, params: dict[str, Any]) -> dict[str, Any]:
        req = validate_install(params, max_bytes=self.config.max_upload_bytes)
        preset = await asyncio.to_thread(self.presets.install, req.name, req.data, overwrite=req.overwrite)
        return {"name": preset.name, "language": preset.prompt.language, "frames": preset.prompt.num_frames}

    async def presets_remove(self, params: dict[str, Any]) -> dict[str, Any]:
        name = validate_remove(params)
        await asyncio.to_thread(self.presets.remove, name)
        return {"name": name, "removed": True}

    async def rescan_presets(self) -> None:
        """SIGHUP: re-read the presets folders (files added or removed by hand)."""
        await asyncio.to_thread(self.presets.rescan)

    # ------------------------------------------------------------------ cache
    async def cache_stats(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        validate_empty(params)
        return await asyncio.to_thread(self.cache.stats)

    async def cache_prune(self, params: dict[str, Any]) -> dict[str, Any]:
        req = validate_prune(params)
        return await asyncio.to_thread(self.cache.prune, req.max_age_s, req.max_bytes, req.dry_run)
