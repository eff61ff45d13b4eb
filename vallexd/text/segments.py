"""Segments: input clean-up, `mix` tags, `auto` language identification, per-segment assembly.

Rules (TEXT-FRONTEND.md, "Segments"): newlines are removed and surrounding
spaces stripped; `en`/`zh`/`ja` make the whole text one segment; `mix` text
carries `[EN]…[EN]`, `[ZH]…[ZH]`, `[JA]…[JA]` segments (text outside them may only
be whitespace and punctuation: untagged words are refused with BAD_MIX_TAGS, see
`_check_outside`); `auto` picks one of en/zh/ja for the whole text with langid
restricted to those three. Each segment's phonemes get a trailing space,
trailing whitespace is removed and a `.` appended unless they end in one of
`. , ! ? - … ~`.

Stricter than the reference on purpose: mix tags must come in same-language
open/close pairs without nesting (the reference matched each language's
pattern independently and silently produced overlapping segments), and
control/format characters are dropped before anything else sees them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vallexd.constants import LANGUAGES
from vallexd.errors import InvalidArgument
from vallexd.text.lazy import Lazy
from vallexd.text.normalize import normalize_text

TAG_TO_LANGUAGE = {"EN": "en", "ZH": "zh", "JA": "ja"}
LANGUAGE_TO_TAG = {v: k for k, v in TAG_TO_LANGUAGE.items()}
TAG_RE = re.compile(r"\[(EN|ZH|JA)\]")

_SEGMENT_END = frozenset(".,!?-…~")
_trailing_ws_re = re.compile(r"\s+$")


@dataclass(frozen=True)
class Segment:
    language: str  # "en" | "zh" | "ja"
    text: str


def clean_input(text: str) -> str:
    """The one normalisation (`normalize.normalize_text`), then line breaks read as spaces: a
    line break is a word boundary in every language (the reference removed it and glued the
    words on either side together)."""
    return normalize_text(text).replace("\n", " ")


def _load_langid() -> Any:
    from langid.langid import LanguageIdentifier, model

    # Our own identifier: the module-level one is shared global state that
    # other code could re-restrict; ours is fixed to the three languages.
    identifier = LanguageIdentifier.from_modelstring(model, norm_probs=False)
    identifier.set_languages(list(LANGUAGES))
    return identifier


LANGID: Lazy[Any] = Lazy("langid", _load_langid)


def detect(text: str) -> str:
    """en/zh/ja for already-cleaned, non-empty text (langid restricted to the three)."""
    language = LANGID.get().classify(text)[0]
    return str(language)


def parse_mix(text: str) -> list[tuple[str, Segment | None]]:
    """Split mix text into (outside_text, segment) units, in order.

    The last unit's segment is None when there is trailing outside text.
    Raises InvalidArgument(BAD_MIX_TAGS) for unbalanced, mismatched or nested tags,
    and for text with no tagged segment at all.
    """
    units: list[tuple[str, Segment | None]] = []
    pos = 0
    tags = list(TAG_RE.finditer(text))
    if not tags:
        raise InvalidArgument(
            "mix text needs tagged segments such as [EN]hello[EN][ZH]你好[ZH]", reason="BAD_MIX_TAGS"
        )
    if len(tags) % 2:
        raise InvalidArgument(
            f"unbalanced mix tags: {tags[-1].group(0)} at character {tags[-1].start()} is never closed",
            reason="BAD_MIX_TAGS",
        )
    for open_tag, close_tag in zip(tags[0::2], tags[1::2], strict=True):
        _check_outside(text, pos, open_tag.start())
        if open_tag.group(1) != close_tag.group(1):
            raise InvalidArgument(
                f"mix tag {open_tag.group(0)} at character {open_tag.start()} is closed by "
                f"{close_tag.group(0)} at character {close_tag.start()}; segments must not nest or overlap",
                reason="BAD_MIX_TAGS",
            )
        segment = Segment(TAG_TO_LANGUAGE[open_tag.group(1)], text[open_tag.end() : close_tag.start()])
        units.append((text[pos : open_tag.start()], segment))
        pos = close_tag.end()
    if pos < len(text):
        _check_outside(text, pos, len(text))
        units.append((text[pos:], None))
    return units


_OUTSIDE_SHOWN = 40


def _check_outside(text: str, start: int, end: int) -> None:
    """Text outside tags may only be whitespace, punctuation or symbols (nothing to speak).

    Deviation: the reference silently dropped untagged words (`[ZH]你好[ZH]こんにちは` never
    said こんにちは); a client that forgot a tag now hears about it instead of losing text.
    """
    outside = text[start:end]
    first = next((i for i, ch in enumerate(outside) if ch.isalnum()), None)
    if first is None:
        return
    snippet = outside.strip()
    shown = snippet if len(snippet) <= _OUTSIDE_SHOWN else snippet[:_OUTSIDE_SHOWN] + "…"
    raise InvalidArgument(
        f"mix text has untagged text {shown!r} at character {start + first}; it would not be "
        "spoken: wrap it in [EN]…[EN], [ZH]…[ZH] or [JA]…[JA], or use language auto",
        reason="BAD_MIX_TAGS",
        details={"position": start + first, "text": shown},
    )


def mix_segments(text: str) -> list[Segment]:
    return [seg for _, seg in parse_mix(text) if seg is not None]


def finish_segment(phonemes: str) -> str:
    """The reference per-segment tail rule: trailing space, strip, then `.` unless it ends a sentence."""
    phonemes = _trailing_ws_re.sub("", phonemes + " ")
    if phonemes and phonemes[-1] not in _SEGMENT_END:
        phonemes += "."
    return phonemes
