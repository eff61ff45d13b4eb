"""The service core both transports call: request -> validation -> cache -> queue -> model -> WAV.

    synthesize: validate -> preset lookup -> cache key -> hit? return it (the model is never touched)
                -> text front end (its own thread) -> worker queue -> engine -> WAV -> cache -> result

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
import inspect
import logging
import os
import time
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from vallexd import __version__
from vallexd.config import Config
from vallexd.constants import SAMPLE_RATE
from vallexd.errors import Busy, InvalidArgument, Timeout, Unavailable, VallexError
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
        self.counters = {"synthesize": 0, "cache_hits": 0, "errors": 0}

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
        req = validate_synthesize(params, max_text_chars=self.config.max_text_chars)
        preset = self.presets.get(req.voice) if req.voice is not None else None
        key = self._cache_key(req, preset)
        want_audio = req.return_mode == "audio"
        if not req.fresh:
            hit = await asyncio.to_thread(self._read_hit, key, want_audio)
            if hit is not None:
                self.counters["cache_hits"] += 1
                data, path, seconds = hit
                return self._result(key, data, path, seconds, cached=True, pieces=0, started=started)

        pieces = await self._prepare(req, started, cancelled)
        text_done = time.monotonic()
        audio = await self._run_model(req, preset, pieces, started, progress, cancelled)
        model_done = time.monotonic()
        rate = self._sample_rate()
        data = await asyncio.to_thread(wav_bytes, audio, rate)
        path = await self._store(key, data, want_audio)
        result = self._result(key, data if want_audio else None, path, duration_s(len(audio), rate),
                              cached=False, pieces=len(pieces), started=started)
        result.timings.update(text_ms=_ms(text_done - started), model_ms=_ms(model_done - text_done))
        return result

    def _cache_key(self, req: SynthesisRequest, preset: Preset | None) -> str:
        return cache_key(
            engine_identity=self.worker.identity,
            preset_digest=preset.digest if preset is not None else None,
            text=req.text, language=req.language, accent=req.accent,
            # true and "auto" give the same audio; the split depends on the phoneme budget
            long="whole" if req.long is False else f"split:{self._split_budget()}",
            top_k=req.top_k, temperature=req.temperature, seed=req.seed,
        )

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
