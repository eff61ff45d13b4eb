"""Japanese text → IPA-like phonemes with pitch-accent marks, as the reference `japanese_to_ipa2`.

The text is cut at characters that are not kana, kanji, Latin letters or
digits; each run goes through OpenJTalk's full-context labels
(pyopenjtalk-plus, whose wheel carries the dictionary: nothing downloads) and
becomes romaji with `↓` (fall after the accent nucleus), `↑` (rise after the
first mora) and a space at accent-phrase boundaries. The separators are kept
through unidecode. Then the geminate `Q` and moraic `N` are resolved from the
next consonant and romaji becomes IPA.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from typing import Any

from unidecode import unidecode

from vallexd.text.lazy import Lazy

log = logging.getLogger(__name__)

_JA_CHARS = r"A-Za-z\d\u3005\u3040-\u30ff\u4e00-\u9fff\uff11-\uff19\uff21-\uff3a\uff41-\uff5a\uff66-\uff9d"
_japanese_characters = re.compile(f"[{_JA_CHARS}]")
_japanese_marks = re.compile(f"[^{_JA_CHARS}]")

_phoneme_re = re.compile(r"\-([^\+]*)\+")
_a1_re = re.compile(r"/A:(\-?[0-9]+)\+")
_a2_re = re.compile(r"\+(\d+)\+")
_a3_re = re.compile(r"\+(\d+)/")

_SOKUON = [  # geminate: the closure of the next consonant
    (re.compile(r"Q([↑↓]*[kg])"), r"k#\1"),
    (re.compile(r"Q([↑↓]*[tdjʧ])"), r"t#\1"),
    (re.compile(r"Q([↑↓]*[sʃ])"), r"s\1"),
    (re.compile(r"Q([↑↓]*[pb])"), r"p#\1"),
]
_HATSUON = [  # moraic nasal: assimilates to the next consonant's place
    (re.compile(r"N([↑↓]*[pbm])"), r"m\1"),
    (re.compile(r"N([↑↓]*[ʧʥj])"), r"n^\1"),
    (re.compile(r"N([↑↓]*[tdn])"), r"n\1"),
    (re.compile(r"N([↑↓]*[kg])"), r"ŋ\1"),
]
# Applied in this order (the order is part of the contract: "ni" after "y"→"j", etc.).
_ROMAJI_TO_IPA = [
    ("u", "ɯ"), ("ʧ", "tʃ"), ("j", "dʑ"), ("y", "j"), ("ni", "n^i"), ("nj", "n^"), ("hi", "çi"),
    ("hj", "ç"), ("f", "ɸ"), ("I", "i*"), ("U", "ɯ*"), ("r", "ɾ"),
]  # fmt: skip


def _load_openjtalk() -> Any:
    # pyopenjtalk-plus print()s an "ONNX Runtime is not installed" notice to stdout on import
    # (its optional reading model for 何; the reference ran without it too). stdout may be a
    # CLI's machine-readable output, so capture the notice and log it instead.
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        import pyopenjtalk
    if captured.getvalue().strip():
        log.debug("pyopenjtalk: %s", captured.getvalue().strip())
    # pyopenjtalk-plus calls sudachipy's deprecated Dictionary.create() in every new thread.
    warnings.filterwarnings(
        "ignore", message=r"Dictionary\.create\(\) is deprecated", category=DeprecationWarning
    )
    pyopenjtalk.extract_fullcontext("あ")  # builds the global OpenJTalk instance and its dictionary
    return pyopenjtalk.extract_fullcontext


OPENJTALK: Lazy[Any] = Lazy("openjtalk", _load_openjtalk)


def warm_up() -> None:
    OPENJTALK.get()
    # 出 is one of pyopenjtalk-plus's multi-reading kanji: the first such word loads its Sudachi
    # dictionary, which should happen here rather than in someone's first request.
    japanese_to_ipa2("今日は、333メートル出かけます。")


def _run_to_romaji(run: str) -> str:
    """One Japanese run → romaji with accent marks (from the full-context labels)."""
    labels = OPENJTALK.get()(run)
    out = ""
    for n, label in enumerate(labels):
        phoneme = _phoneme_re.search(label).group(1)  # type: ignore[union-attr]
        if phoneme in ("sil", "pau"):
            continue
        out += phoneme.replace("ch", "ʧ").replace("sh", "ʃ").replace("cl", "Q")
        a1 = int(_a1_re.search(label).group(1))  # type: ignore[union-attr]
        a2 = int(_a2_re.search(label).group(1))  # type: ignore[union-attr]
        a3 = int(_a3_re.search(label).group(1))  # type: ignore[union-attr]
        # A non-silence label is always followed by one (the utterance ends in "sil").
        nxt = labels[n + 1]
        if _phoneme_re.search(nxt).group(1) in ("sil", "pau"):  # type: ignore[union-attr]
            a2_next = -1
        else:
            a2_next = int(_a2_re.search(nxt).group(1))  # type: ignore[union-attr]
        if a3 == 1 and a2_next == 1:  # accent phrase boundary
            out += " "
        elif a1 == 0 and a2_next == a2 + 1:  # falling after the nucleus
            out += "↓"
        elif a2 == 1 and a2_next == 2:  # rising after the first mora
            out += "↑"
    return out


def japanese_to_romaji_with_accent(text: str) -> str:
    text = text.replace("％", "パーセント")
    runs = _japanese_marks.split(text)
    marks = _japanese_marks.findall(text)
    out = ""
    for i, run in enumerate(runs):
        if _japanese_characters.match(run):
            if out != "":
                out += " "
            out += _run_to_romaji(run)
        if i < len(marks):
            out += unidecode(marks[i]).replace(" ", "")
    return out


def japanese_to_ipa2(text: str) -> str:
    """The reference Japanese conversion."""
    text = japanese_to_romaji_with_accent(text).replace("...", "…")
    for regex, replacement in _SOKUON:
        text = regex.sub(replacement, text)
    for regex, replacement in _HATSUON:
        text = regex.sub(replacement, text)
    for old, new in _ROMAJI_TO_IPA:
        text = text.replace(old, new)
    return text
