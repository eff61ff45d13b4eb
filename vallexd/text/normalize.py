"""The one normalisation of request text, applied once before both the cache key and the front end.

`normalize_text` maps every spelling the front end would read alike onto one string, so
two requests whose normalised texts are equal get the same phonemes, and a cache entry can
never be served for a text the front end would read differently (issue 12, fault 3):

- Unicode NFC (a decomposed `パ` or `ã` from a macOS file or an IME reads as the composed one);
- every kind of line break (CRLF, CR, LF, VT, FF, NEL U+0085, LS U+2028, PS U+2029, the
  file/group/record separators `str.splitlines` knows) becomes `\\n`, a word boundary. The
  reference removed newlines, which glued "red\\r\\nViolets" into one unknown word; we keep
  them as boundaries (docs/text-frontend-deviations.md). `\\n` still ends a sentence for the
  long-text splitter; the converters read it as a space;
- whole emoji sequences are dropped (a pictograph with its variation selectors, skin tones,
  keycap, tag characters and ZWJ joins), and so are stray variation selectors: they have no
  sound, and their parts reached the model as [UNK] tokens in Mandarin;
- controls, format characters (ZWJ, BOM, bidi marks), surrogates, private-use and unassigned
  code points are dropped;
- other whitespace becomes a space; runs of whitespace collapse to one (`\\n` if the run
  holds a line break); the ends are stripped.

It is idempotent: `normalize_text(normalize_text(t)) == normalize_text(t)`.
"""

from __future__ import annotations

import re
import unicodedata

# Everything str.splitlines() treats as a line boundary.
_LINE_BREAK_RE = re.compile("\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# Emoji-ish pictographs (category So in these blocks), or any symbol/punctuation forced to
# emoji presentation by U+FE0F (©️ ‼️).
_PICTO = "\u2300-\u23ff\u2600-\u27bf\u2b00-\u2bff\u3297\u3299\U0001f000-\U0001faff"
_MODIFIER = "[\ufe0e\ufe0f\u20e3\U0001f3fb-\U0001f3ff\U000e0020-\U000e007f]"
_ELEMENT = rf"(?:[0-9#*]\ufe0f?\u20e3|[{_PICTO}]|[^\s\w]\ufe0f){_MODIFIER}*"
_EMOJI_SEQUENCE_RE = re.compile(rf"{_ELEMENT}(?:\u200d{_ELEMENT})*")
# Left over after the sequences: selectors and modifiers attached to nothing we drop.
_STRAY_RE = re.compile(rf"{_MODIFIER}|[\U000e0100-\U000e01ef]")
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
_SPACE_RUN_RE = re.compile(r"[ \n]+")


def drop_emoji(text: str) -> str:
    """Remove whole emoji sequences and stray variation selectors / emoji modifiers."""
    return _STRAY_RE.sub("", _EMOJI_SEQUENCE_RE.sub(_emoji_gap, text))


def _emoji_gap(m: re.Match[str]) -> str:
    # Numbers that live in the pictographic blocks (circled digits ❶, U+1F100 "0.") are read,
    # not dropped; everything else there is a symbol.
    return m.group(0) if unicodedata.category(m.group(0)[0]) == "No" else ""


def normalize_text(text: str) -> str:
    """The canonical form of request text (see the module docstring)."""
    text = unicodedata.normalize("NFC", text)
    text = _LINE_BREAK_RE.sub("\n", text)
    text = drop_emoji(text)
    out = []
    for ch in text:
        if ch == "\n":
            out.append(ch)
        elif ch.isspace():
            out.append(" ")
        elif unicodedata.category(ch) not in _DROP_CATEGORIES:
            out.append(ch)
    text = "".join(out)
    text = _SPACE_RUN_RE.sub(lambda m: "\n" if "\n" in m.group(0) else " ", text)
    # Again: dropping a control between a letter and a combining mark can make a new pair.
    return unicodedata.normalize("NFC", text).strip(" \n")
