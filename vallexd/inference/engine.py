"""The inference engine: VALL-E X codes generation plus the Vocos vocoder, behind one small API.

The worker owns one Engine and calls it from a single thread.  Inputs are
validated here too (the service validates wire params first; this is the
last line of defence for library callers): bad input raises
`InvalidArgument` and changes nothing.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vallexd.constants import HOP, MIN_TEMPERATURE, MODEL_LANGUAGES, NUM_QUANTIZERS, SAMPLE_RATE
from vallexd.errors import Internal, InvalidArgument, Timeout
from vallexd.inference.checkpoint import load_model
from vallexd.inference.devices import describe, dtype_name, memory_now, open_device
from vallexd.inference.model import Cancelled, NonFiniteLogits, VallEX, language_ids
from vallexd.inference.quantize import check_int8, quantize_mode, quantize_model
from vallexd.inference.scheduler import LONG_MODES, PieceFn, Request, Scheduler
from vallexd.inference.vocoder import Vocoder, vocoder_device
from vallexd.storage.fsutil import sha256_file
from vallexd.storage.prompts import LANG_CODES, Prompt, validate_arrays
from vallexd.types import Sampling


def _check_sampling(sampling: Sampling) -> None:
    if isinstance(sampling.top_k, bool) or not isinstance(sampling.top_k, int):
        raise InvalidArgument(f"top_k must be an integer, got {sampling.top_k!r}", reason="BAD_SAMPLING")
    t = sampling.temperature
    # Below ~0.01, float32 logits / T overflow to inf and the softmax turns to NaN.
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < MIN_TEMPERATURE:
        raise InvalidArgument(
            f"temperature must be a number >= {MIN_TEMPERATURE}, got {t!r}", reason="BAD_SAMPLING"
        )
    if sampling.seed is not None and (isinstance(sampling.seed, bool) or not isinstance(sampling.seed, int)):
        raise InvalidArgument(f"seed must be an integer, got {sampling.seed!r}", reason="BAD_SAMPLING")


def _check_language(lang: object, what: str) -> str:
    if not isinstance(lang, str) or lang not in MODEL_LANGUAGES:
        raise InvalidArgument(f"{what} must be one of en, zh, ja, got {lang!r}", reason="UNKNOWN_LANGUAGE")
    return str(lang)


def model_error(exc: Exception) -> Exception:
    """The typed error for a model-level exception (Cancelled, NonFiniteLogits); others unchanged."""
    if isinstance(exc, Cancelled):
        return Timeout("synthesis cancelled", reason="CANCELLED")
    if isinstance(exc, NonFiniteLogits):
        return Internal(f"the model produced non-finite logits ({exc.stage} stage)", reason="NON_FINITE",
                        details={"stage": exc.stage})
    return exc


class Engine:
    sample_rate: int = SAMPLE_RATE

    def __init__(
        self, model: VallEX, vocoder: Vocoder, device: torch.device, dtype: torch.dtype, identity: str
    ) -> None:
        self.model = model
        self.vocoder = vocoder
        self._device = device
        self._dtype = dtype
        self.identity = identity
        self.compiled = False
        self._device_info: dict[str, Any] | None = None

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def dtype(self) -> str:
        return dtype_name(self._dtype)

    @property
    def device_info(self) -> dict[str, Any]:
        """For `status`: the device's name, capability, memory and driver, plus live CUDA memory."""
        if self._device_info is None:
            self._device_info = describe(self._device)
        return {**self._device_info, **memory_now(self._device), "vocoder_device": str(self.vocoder.device)}

    @property
    def quantize(self) -> str:
        """Which decoders run int8 weight matmuls: "none", "nar" or "all" (see quantize.py)."""
        return quantize_mode(self.model)

    @property
    def threads(self) -> int:
        """torch's intra-op CPU threads (what --threads set, or torch's default)."""
        return torch.get_num_threads()

    @classmethod
    def load(cls, checkpoint: Path, vocos_dir: Path, *, device: str = "auto", dtype: str = "auto",
             quantize: str = "none") -> Engine:
        """Raises InvalidArgument (BAD_DTYPE, BAD_DEVICE, BAD_QUANTIZE), Unavailable, CheckpointError."""
        dev, dt = open_device(device, dtype)  # resolved, made current, and probed with one kernel
        check_int8(quantize, dev)  # before the 1.5 GB load: a refused mode costs nothing
        model = load_model(Path(checkpoint), dev, dt)
        quantize_model(model, quantize)
        vocoder = Vocoder.load(Path(vocos_dir), vocoder_device(dev))
        # Content digest of everything that shapes the audio: model weights, vocoder, numeric precision.
        h = hashlib.sha256(b"vallexd-engine-v2\0")
        for part in (
            Path(checkpoint),
            Path(vocos_dir) / "config.yaml",
            Path(vocos_dir) / "pytorch_model.bin",
        ):
            h.update(bytes.fromhex(sha256_file(part)))
        h.update(dtype_name(dt).encode())
        h.update(dev.type.encode())  # CPU and CUDA generators draw differently for the same seed
        if quantize != "none":  # (unquantized engines keep the digest they always had)
            h.update(f"int8:{quantize}".encode())
        engine = cls(model, vocoder, dev, dt, h.hexdigest())
        engine._device_info = describe(dev)  # here, in the model thread: status only reads it
        return engine

    def compile(self) -> None:
        """torch.compile the model's dense parts and build every graph now (see compiled.py)."""
        from vallexd.inference.compiled import compile_model, warm_up

        compile_model(self.model)
        warm_up(self)
        self.compiled = True

    def make_generator(self, sampling: Sampling) -> torch.Generator:
        """A request's own generator: seeded from the request, else from `secrets` (never the global RNG)."""
        gen = torch.Generator(device=self._device)
        gen.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        return gen

    def _validate(
        self, text_ids: Sequence[int], text_language: str | Sequence[str], prompt: Prompt | None
    ) -> tuple[list[int], str | list[str], list[int], np.ndarray, str]:
        """Check one piece: (ids, text language(s), enrolled ids, prompt codes (P, 8), prompt language).

        Host-side only (no device tensors); raises InvalidArgument."""
        ids = list(text_ids)
        if not ids:
            raise InvalidArgument("text_ids is empty", reason="EMPTY_TEXT")
        vocab = self.model.cfg.text_vocab
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < vocab:
                raise InvalidArgument(f"text id {i!r} is outside 0..{vocab - 1}", reason="BAD_TEXT_IDS")
        if isinstance(text_language, str):
            _check_language(text_language, "text language")
        else:
            langs = list(text_language)
            if len(langs) != len(ids):
                raise InvalidArgument(
                    f"{len(langs)} token languages for {len(ids)} text ids", reason="BAD_TEXT_LANGUAGE"
                )
            for lang in langs:
                _check_language(lang, "token language")
            text_language = langs
        if prompt is not None:
            prompt_language = _check_language(prompt.language, "prompt language")
            # Prompts built in memory (not loaded from a file) get the same checks as files.
            prompt = validate_arrays(
                np.asarray(prompt.audio_tokens),
                np.asarray(prompt.text_tokens),
                np.asarray(LANG_CODES[prompt_language]),
                "prompt",
            )
            enroll = [int(i) for i in prompt.text_tokens.reshape(-1)]
            codes = prompt.audio_tokens.reshape(-1, NUM_QUANTIZERS)
        else:
            enroll, codes = [], np.zeros((0, NUM_QUANTIZERS), dtype=np.int64)
            prompt_language = text_language if isinstance(text_language, str) else text_language[0]
        return [int(i) for i in ids], text_language, enroll, codes, prompt_language

    def _inputs(
        self, text_ids: Sequence[int], text_language: str | Sequence[str], prompt: Prompt | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate and build (x (S,), langs (S,), prompt codes (P, 8)) on the model's device."""
        ids, text_language, enroll, codes, prompt_language = self._validate(text_ids, text_language, prompt)
        lang_rows = language_ids(len(enroll), prompt_language, text_language, len(ids))
        dev = self._device
        x = torch.tensor(enroll + ids, dtype=torch.long, device=dev)
        return x, torch.tensor(lang_rows, dtype=torch.long, device=dev), torch.as_tensor(codes, device=dev)

    def generate_codes(
        self,
        text_ids: Sequence[int],
        text_language: str | Sequence[str],
        prompt: Prompt | None,
        sampling: Sampling,
        generator: torch.Generator | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """(T, 8) int64 codes for one piece of text; T may be 0 if the model draws EOS at once."""
        _check_sampling(sampling)
        x, langs, codes = self._inputs(text_ids, text_language, prompt)
        gen = generator if generator is not None else self.make_generator(sampling)
        try:
            out = self.model.generate(
                x,
                langs,
                codes,
                top_k=sampling.top_k,
                temperature=float(sampling.temperature),
                generator=gen,
                should_stop=should_stop,
            )
        except (Cancelled, NonFiniteLogits) as exc:
            raise model_error(exc) from None
        return out.cpu().numpy().astype(np.int64, copy=False)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(T, 8) codes -> (T * 320,) float32 audio at 24 kHz."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != NUM_QUANTIZERS:
            raise InvalidArgument(f"codes must have shape (T, 8), got {codes.shape}", reason="BAD_CODES")
        if codes.size and (codes.min() < 0 or codes.max() > 1023):
            raise InvalidArgument("codes must lie in 0..1023", reason="BAD_CODES")
        audio = self.vocoder.decode(codes)
        if audio.shape[0] != codes.shape[0] * HOP:  # a vocoder config with another hop would break timing
            raise Internal(f"vocoder returned {audio.shape[0]} samples for {codes.shape[0]} frames")
        return audio

    def new_request(
        self,
        pieces: list[tuple[Sequence[int], str | Sequence[str]]],
        prompt: Prompt | None,
        sampling: Sampling,
        *,
        long_mode: str = "fixed",
        should_stop: Callable[[], bool] | None = None,
        on_piece: PieceFn | None = None,
        tag: Any = None,
    ) -> Request:
        """Validate a whole synthesis (every piece, before any work) into a scheduler Request.

        `long_mode`: "fixed" (every piece prompted by `prompt`) or "sliding" (see scheduler.py);
        without a prompt a request always slides.  Raises InvalidArgument.
        """
        if not pieces:
            raise InvalidArgument("nothing to synthesize", reason="EMPTY_TEXT")
        if long_mode not in LONG_MODES:
            raise InvalidArgument(f"long_mode must be one of {', '.join(LONG_MODES)}, got {long_mode!r}",
                                  reason="BAD_LONG_MODE")
        _check_sampling(sampling)
        checked = [self._validate(ids, langs, prompt) for ids, langs in pieces]
        _, _, enroll, codes, prompt_language = checked[0]
        gen = self.make_generator(sampling)
        # One seed per piece, drawn up front: a piece's draws never depend on how pieces are scheduled.
        seeds = torch.randint(0, 2**62, (len(pieces),), generator=gen, device=gen.device).tolist()
        return Request(
            inputs=[(ids, langs) for ids, langs, _, _, _ in checked],
            prompt_ids=enroll,
            # torch.tensor copies: a preset's arrays are read-only (as_tensor would warn and share them).
            prompt_codes=torch.tensor(codes, dtype=torch.long, device=self._device),
            prompt_language=prompt_language,
            top_k=int(sampling.top_k),
            temperature=float(sampling.temperature),
            long_mode="sliding" if prompt is None else long_mode,
            generator=gen,
            seeds=[int(s) for s in seeds],
            should_stop=should_stop,
            on_piece=on_piece,
            tag=tag,
        )

    def synthesize(
        self,
        pieces: list[tuple[Sequence[int], str | Sequence[str]]],
        prompt: Prompt | None,
        sampling: Sampling,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        *,
        long_mode: str = "fixed",
        on_piece: PieceFn | None = None,
        max_batch: int = 1,
    ) -> np.ndarray:
        """One request alone (its fixed-mode pieces may share `max_batch` rows): float32 audio, the
        concatenation of its pieces.  `progress(done, total)` and `on_piece(index, total, audio)`
        follow each piece in order.  Raises InvalidArgument, Timeout(CANCELLED), Internal(NON_FINITE)."""

        def piece_done(i: int, total: int, audio: np.ndarray) -> None:
            if on_piece is not None:
                on_piece(i, total, audio)
            if progress is not None:
                progress(i + 1, total)

        req = self.new_request(pieces, prompt, sampling, long_mode=long_mode, should_stop=should_stop,
                               on_piece=piece_done)
        sched = Scheduler(self, max_batch)
        sched.add(req)
        while not sched.idle:
            sched.schedule()
            sched.step()
        if req.error is not None:
            raise model_error(req.error)
        return req.result()
