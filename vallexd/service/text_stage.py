"""The text stage of a synthesis: one normalisation, splitting and phonemizing (in the one text
thread: OpenJTalk & co. are not known to be thread-safe), and the memo of which model input a text
produced.

Why a memo: the cache key is the model input (phoneme ids and token languages of every piece), so
two spellings of one text share an entry. To answer a repeated request without the text thread, the
digest of its model input is remembered (in memory, bounded) per normalised text + language +
accent + long-text split and mode: the front end is deterministic in those within one process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from vallexd.config import Config
from vallexd.errors import InvalidArgument, VallexError, cancelled_error, deadline_error
from vallexd.service.requests import SynthesisRequest
from vallexd.types import Piece

log = logging.getLogger(__name__)

#: Remembered text -> model-input digests (two 64-character hex strings an entry).
MODEL_INPUT_MEMO = 16384


def model_input_digest(pieces: list[Piece]) -> str:
    """sha256 hex of what the model reads: every piece's phoneme ids and token language(s)."""
    doc = [[[int(i) for i in ids], langs if isinstance(langs, str) else list(langs)] for ids, langs in pieces]
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def long_mode(req: SynthesisRequest) -> str:
    """The effective long-text mode: without a voice always sliding; else as asked, fixed by default."""
    if req.voice is None:
        return "sliding"
    return req.long_mode or "fixed"


def warm_text() -> None:
    """Load jieba, OpenJTalk and the CMU dictionary now (in the text thread), logging the time."""
    try:
        from vallexd import text as frontend

        spent = frontend.warm_up()
        log.info("text front end ready (%s)", ", ".join(f"{k} {v:.1f}s" for k, v in spent.items()))
    except Exception:  # a front end that cannot warm up will report properly on first use
        log.warning("text front end warm-up failed", exc_info=True)


def raise_if_cancelled(cancelled: asyncio.Event | None) -> None:
    """Timeout(CANCELLED) once the client went away (its request's `cancelled` event is set)."""
    if cancelled is not None and cancelled.is_set():
        raise cancelled_error()


class TextStage:
    """Normalise, split and phonemize requests; remember each text's model input."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vallexd-text")
        self.memo: OrderedDict[str, str] = OrderedDict()  # text digest -> model input digest

    @staticmethod
    def normalised(req: SynthesisRequest) -> SynthesisRequest:
        """The request with its text in the one canonical form both the key and the front end see."""
        from vallexd.text.normalize import normalize_text

        text = normalize_text(req.text)
        if not text:
            raise InvalidArgument("text is empty", reason="EMPTY_TEXT", details={"field": "text"})
        return dataclasses.replace(req, text=text)

    def budget(self) -> int:
        """The effective phoneme budget per piece for long text."""
        from vallexd.text import DEFAULT_PHONEME_BUDGET

        return int(self.config.long_budget or DEFAULT_PHONEME_BUDGET)

    def digest(self, req: SynthesisRequest) -> str:
        """What determines the model input besides the front end's code: normalised text,
        language, accent, long-text split and mode (the memo's key)."""
        doc = [req.text, req.language, req.accent,
               # true and "auto" split alike; the split depends on the phoneme budget
               "whole" if req.long is False else f"split:{self.budget()}:{long_mode(req)}"]
        return hashlib.sha256(json.dumps(doc, ensure_ascii=False).encode()).hexdigest()

    def known(self, text_key: str) -> str | None:
        """The remembered model-input digest of a text digest, or None."""
        digest = self.memo.get(text_key)
        if digest is not None:
            self.memo.move_to_end(text_key)
        return digest

    def remember(self, text_key: str, digest: str) -> None:
        self.memo[text_key] = digest
        self.memo.move_to_end(text_key)
        while len(self.memo) > MODEL_INPUT_MEMO:
            self.memo.popitem(last=False)

    def pieces(self, req: SynthesisRequest, deadline: float, cancelled: asyncio.Event | None) -> list[Piece]:
        """Blocking, in the text thread: split (long mode) and phonemize into engine pieces.

        Raises InvalidArgument (EMPTY_TEXT, UNKNOWN_LANGUAGE, BAD_MIX_TAGS, ...), TooLarge
        (TEXT_TOO_LONG), Timeout (CANCELLED when the client left while it waited for this thread,
        DEADLINE past `deadline`, a time.monotonic() value).
        """
        from vallexd import text as frontend

        # The request may have waited for this thread: do not phonemize for nobody.
        raise_if_cancelled(cancelled)
        if time.monotonic() >= deadline:
            raise deadline_error(self.config.request_timeout_s)
        language = req.language
        if language == "auto":
            # Resolve once for the whole text so every piece speaks the same language.
            language = frontend.detect_language(req.text)
        # split_text packs sentences greedily up to the budget, so a short text stays one
        # piece: "auto" and true behave the same (true is the old API's `longprompt`).
        # short_first: a text of several pieces starts with its first sentence alone, so its first
        # audio comes after one sentence's work (costs one more, shorter piece).
        texts = [req.text] if req.long is False else frontend.split_text(
            req.text, language, budget=self.budget(), short_first=True)
        pieces: list[Piece] = []
        empty: VallexError | None = None
        for piece_text in texts:
            try:
                ph = frontend.phonemize(piece_text, language, max_chars=self.config.max_text_chars)
            except InvalidArgument as exc:
                if exc.reason != "EMPTY_TEXT":
                    raise
                empty = exc  # a piece of punctuation only: nothing to say, skip it
                continue
            pieces.append((ph.ids, frontend.token_languages(ph, req.accent)))
        if not pieces:
            raise empty or InvalidArgument("text is empty", reason="EMPTY_TEXT", details={"field": "text"})
        return pieces
