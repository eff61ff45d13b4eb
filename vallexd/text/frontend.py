"""phonemize() and token_languages(): text → the token ids and per-token languages the model takes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vallexd.constants import ACCENTS, REQUEST_LANGUAGES
from vallexd.errors import InvalidArgument, short_repr, text_too_long
from vallexd.text import segments
from vallexd.text.segments import LANGUAGES, Segment
from vallexd.text.vocab import has_sound, phoneme_ids


@dataclass(frozen=True)
class Phonemes:
    phonemes: str  # one character per token, spaces as "_"
    ids: tuple[int, ...]  # 70-entry vocabulary ids
    langs: tuple[str, ...]  # "en"/"zh"/"ja" per token
    language: str  # resolved: "en"/"zh"/"ja" ("auto" resolved), or "mix"


def _converter(language: str) -> Callable[[str], str]:
    # Imported here so that importing vallexd.text stays cheap (no jieba/pypinyin/openjtalk).
    if language == "en":
        from vallexd.text.english import english_to_ipa2

        return english_to_ipa2
    if language == "zh":
        from vallexd.text.mandarin import chinese_to_ipa

        return chinese_to_ipa
    from vallexd.text.japanese import japanese_to_ipa2

    return japanese_to_ipa2


def check_request(text: object, language: object, max_chars: int | None = None) -> str:
    """Validate type, language and size (cheap, before any heavy work); return the cleaned text."""
    if not isinstance(language, str) or language not in REQUEST_LANGUAGES:
        raise InvalidArgument(
            f"unknown language {short_repr(language)}; expected one of {', '.join(REQUEST_LANGUAGES)}",
            reason="UNKNOWN_LANGUAGE",
        )
    if not isinstance(text, str):
        raise InvalidArgument(f"text must be a string, not {type(text).__name__}", reason="INVALID_TEXT")
    if max_chars is not None and len(text) > max_chars:
        raise text_too_long(len(text), max_chars)
    cleaned = segments.clean_input(text)
    if not cleaned:
        message = "text is empty" if not text.strip() else \
            "text has nothing speakable once emoji, symbols and control characters are dropped"
        raise InvalidArgument(message, reason="EMPTY_TEXT", details={"field": "text"})
    return cleaned


def resolve_segments(cleaned: str, language: str) -> tuple[str, list[Segment]]:
    """(resolved language, segments) for cleaned, non-empty text."""
    if language == "mix":
        return "mix", segments.mix_segments(cleaned)
    if language == "auto":
        language = segments.detect(cleaned)
    return language, [Segment(language, cleaned)]


def phonemize(text: str, language: str, *, max_chars: int | None = None) -> Phonemes:
    """Convert request text to phonemes, ids and per-token languages.

    Raises InvalidArgument (UNKNOWN_LANGUAGE, EMPTY_TEXT, BAD_MIX_TAGS, INVALID_TEXT)
    or TooLarge (TEXT_TOO_LONG); the max_chars check runs before any heavy work.
    """
    cleaned = check_request(text, language, max_chars)
    resolved, segs = resolve_segments(cleaned, language)
    phonemes = ""
    langs: list[str] = []
    for seg in segs:
        if not seg.text.strip():
            continue
        part = segments.finish_segment(_converter(seg.language)(seg.text))
        phonemes += part
        langs.extend([seg.language] * len(part))
    phonemes = phonemes.replace(" ", "_")
    if not has_sound(phonemes):
        raise InvalidArgument("text has nothing to speak (no letters or words)", reason="EMPTY_TEXT")
    return Phonemes(phonemes, phoneme_ids(phonemes), tuple(langs), resolved)


def detect_language(text: str) -> str:
    """The language `auto` would pick for this text: "en", "zh" or "ja"."""
    cleaned = check_request(text, "auto")
    return segments.detect(cleaned)


def token_languages(ph: Phonemes, accent: str) -> str | list[str]:
    """The language(s) the model's language embedding gets for `ph`.

    "native": one language per token, each token in its own segment's language (the old
    API's noaccent=true);
    "request": ph.language for every token, except for mix text, which has no single
    language and falls back to the per-token list; "en"/"zh"/"ja": that language for
    every token (e.g. English text spoken with a Japanese accent).
    """
    if accent == "native":
        return list(ph.langs)
    if accent == "request":
        return list(ph.langs) if ph.language == "mix" else ph.language
    if accent in LANGUAGES:
        return accent
    raise InvalidArgument(
        f"unknown accent {short_repr(accent)}; expected one of {', '.join(ACCENTS)}", reason="UNKNOWN_ACCENT"
    )


def warm_up(languages: Iterable[str] = LANGUAGES) -> dict[str, float]:
    """Load the resources for `languages` now, and langid for "auto" always (the daemon calls
    this at start; "auto" is the wire default). Returns the seconds spent per language, with
    key "auto" for langid (about 0 when already loaded)."""
    import time

    from vallexd.text import english, japanese, mandarin

    loaders: dict[str, Callable[[], object]] = {
        "en": english.warm_up, "zh": mandarin.warm_up, "ja": japanese.warm_up, "auto": segments.LANGID.get,
    }  # fmt: skip
    spent: dict[str, float] = {}
    for language in dict.fromkeys([*languages, "auto"]):
        if language not in loaders:
            raise InvalidArgument(f"cannot warm up unknown language {language!r}", reason="UNKNOWN_LANGUAGE")
        start = time.perf_counter()
        loaders[language]()
        spent[language] = time.perf_counter() - start
    return spent
