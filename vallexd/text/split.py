"""Long text → pieces the model can speak one at a time, never dropping or reordering text.

Budget. The reference keeps prompt + output under about 20 s of audio (the
model was trained on short utterances and degrades past that). We measured the
53 shared presets (real prompts with their transcripts): the token rate of
real speech, `len(text_tokens) / (audio frames / 75 Hz)`, has a median of
14.3 tokens/s (10th percentile 7.8, 90th 19.0; tokens include stress, tone and
word-gap marks), and the prompts last 4.1 s at the median (90th percentile
9.6 s). `DEFAULT_PHONEME_BUDGET = 120` tokens is then about 8.4 s of speech at
the median rate: 12.5 s with the median prompt, 18 s with a long 9.6 s prompt,
and still under 20 s (15.4 + 4.1 s) for a slow speaker with the median prompt.
The budget counts tokens exactly as `phonemize` makes them (len of `ids`).

Splitting. The text is cut into sentences by its language's conventions
(English: `. ! ? …` followed by a space, not after Mr./Dr./initials, closing
quotes and brackets staying with their sentence; Chinese and Japanese:
`。！？!?…．` with no space needed, never inside 「」“”（）《》 and the like, so
a quotation stays whole); a newline always ends a sentence. A sentence
over the budget is cut at clause punctuation (`, ; :` `，、；：` dashes), then
at spaces, then, for text without either (Chinese, Japanese, very long words),
at character boundaries (never inside a number with its currency, separators and
unit, which stays whole even when it alone exceeds the budget; not inside Latin words
unless nothing else is left; at jieba word boundaries for Chinese, after hiragana runs
for Japanese). Adjacent pieces are then packed greedily
back together while they fit, so a short text stays one piece.

Round trip. For en/zh/ja/auto the pieces are substrings: `"".join(pieces) ==
text` exactly. For `mix`, every piece is valid mix text: a segment cut in two
is closed at the end of one piece and re-opened with the same tag at the start
of the next, so *removing the `[EN]`/`[ZH]`/`[JA]` tags* from the joined pieces
gives the input with its tags removed, exactly, and every character keeps the
language of its segment. Text outside tags (which is not spoken) stays in place.

For `auto` the language is identified once on the whole text and pieces are
measured in that language; phonemize the pieces with `detect_language(text)`
rather than "auto" so a short piece cannot flip language.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from vallexd.errors import InvalidArgument, VallexError, short_repr
from vallexd.text import segments
from vallexd.text.frontend import check_request, phonemize

DEFAULT_PHONEME_BUDGET = 120
MIN_PHONEME_BUDGET = 16  # below this a single word or Chinese character may not fit
# Text longer than this many characters per budget token is taken as over budget unmeasured:
# every speakable character yields at least about one token (English ~1.2, Japanese ~2.8,
# Chinese ~5 per character in our measurements).
_MEASURE_CHARS_PER_TOKEN = 3

_CLOSERS = "\"'”’)\\]}»」』）》】〕〉"
_NEWLINE_RE = re.compile(r"\s*\n\s*")
_EN_SENTENCE_RE = re.compile(rf"[.!?…]+[{_CLOSERS}]*(?:\s+|$)")
_CJ_ENDERS = frozenset("。！？!?…．｡")
_CJ_OPENERS = frozenset("「『“‘（(《【〔〈")
_CJ_CLOSERS = frozenset("」』”’）)》】〕〉")
_CLAUSE_RE = re.compile(rf"(?:[,;:][{_CLOSERS}]*\s+|[，、；：]\s*|\s*[—–]+\s*|\s-\s)")
_SPACE_RE = re.compile(r"\s+")
_EN_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "st", "co", "jr", "sr", "maj", "gen", "drs", "rev", "lt", "hon", "sgt",
    "capt", "esq", "ltd", "col", "ft", "prof", "vs", "no", "inc", "mt",
})  # fmt: skip


def _cut_after(text: str, regex: re.Pattern[str], keep: Callable[[str, re.Match[str]], bool]) -> list[str]:
    """Cut `text` after each match of `regex` that `keep` accepts; the parts join back to `text`."""
    parts, start = [], 0
    for m in regex.finditer(text):
        if m.end() > start and m.end() < len(text) and keep(text, m):
            parts.append(text[start : m.end()])
            start = m.end()
    parts.append(text[start:])
    return [p for p in parts if p]


def _always(_text: str, _m: re.Match[str]) -> bool:
    return True


def _english_sentence_end(text: str, m: re.Match[str]) -> bool:
    """False for a period after an abbreviation or an initial ("Dr. Smith", "J. K. Rowling", "e.g. this")."""
    if not m.group(0).startswith(".") or m.group(0).rstrip().rstrip(_CLOSERS) != ".":
        return True
    word = text[: m.start()].rsplit(None, 1)[-1] if text[: m.start()].strip() else ""
    word = word.lstrip(_CLOSERS + "(\"'“‘")
    return not (word.lower() in _EN_ABBREVIATIONS or len(word) == 1 or "." in word)


def _cj_sentences(line: str) -> list[str]:
    """Chinese/Japanese: cut after sentence-final punctuation outside quotes and brackets, so
    「行きましょう！」と言った。 and 他说：“今天很冷。”我们走吧！ keep their quotes whole."""
    parts, start, depth, i, n = [], 0, 0, 0, len(line)
    while i < n:
        ch = line[i]
        if ch in _CJ_OPENERS:
            depth += 1
        elif ch in _CJ_CLOSERS:
            depth = max(0, depth - 1)
        elif ch in _CJ_ENDERS and depth == 0:
            j = i + 1
            while j < n and (line[j] in _CJ_ENDERS or line[j] in _CJ_CLOSERS or line[j].isspace()):
                j += 1
            if j < n:
                parts.append(line[start:j])
                start = j
            i = j
            continue
        i += 1
    parts.append(line[start:])
    return [p for p in parts if p]


def sentences(text: str, language: str) -> list[str]:
    """Sentence-sized parts of one-language text (they join back to `text`)."""
    out: list[str] = []
    for line in _cut_after(text, _NEWLINE_RE, _always):
        if language == "en":
            out.extend(_cut_after(line, _EN_SENTENCE_RE, _english_sentence_end))
        else:
            out.extend(_cj_sentences(line))
    return out


def _clauses(text: str, _language: str) -> list[str]:
    return _cut_after(text, _CLAUSE_RE, _always)


def _words(text: str, _language: str) -> list[str]:
    return _cut_after(text, _SPACE_RE, _always)


def _is_hiragana(ch: str) -> bool:
    return "\u3041" <= ch <= "\u309f"


# A number with its sign, currency, separators and unit: reading it needs all of it at once
# ("$31,419,689" | ",421,557.31" is two other amounts). Separators are one character between
# digits (",", ".", "'", NBSP, narrow NBSP, "·"), so "19, 2023" stays two numbers.
_NUMBER_RE = re.compile(
    r"[-+−]?[$£€¥₹₩¢]?\d+(?:[.,'\u00a0\u202f·]\d+)*(?:\s?[%‰€£$¥¢]|(?:st|nd|rd|th)\b)?"
)


def number_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every number in `text`; no cut may fall strictly inside one."""
    return [m.span() for m in _NUMBER_RE.finditer(text) if m.end() - m.start() > 1]


def _inside_number(spans: list[tuple[int, int]]) -> set[int]:
    return {i for start, end in spans for i in range(start + 1, end)}


def _char_cuts(text: str, language: str, parts: int = 2) -> list[str]:
    """Cut into `parts` pieces of about equal length at the best character boundaries available:
    never inside a number (with its currency, separators and unit) nor inside a Latin word
    when anything else is possible (that would change how it is read); for Chinese at a jieba
    word boundary, for Japanese after a hiragana run (particles and endings close a word) when
    there is one. A text that is one number returns whole: it is spoken in one piece even if
    it alone is over the budget."""
    n = len(text)
    forbidden = _inside_number(number_spans(text))
    anywhere = [i for i in range(1, n) if i not in forbidden]
    allowed = [i for i in anywhere if not (text[i - 1].isalnum() and text[i - 1].isascii()
                                           and text[i].isalnum() and text[i].isascii())]  # fmt: skip
    preferred: list[int] = []
    if language == "zh":
        from vallexd.text.mandarin import JIEBA

        ends, pos = set(), 0
        for word in JIEBA.get().lcut(text, cut_all=False):
            pos += len(word)
            ends.add(pos)
        preferred = [i for i in allowed if i in ends]
    elif language == "ja":
        preferred = [i for i in allowed if _is_hiragana(text[i - 1]) and not _is_hiragana(text[i])]
    candidates = preferred or allowed or anywhere
    if not candidates:
        return [text]
    cuts = sorted({min(candidates, key=lambda i: abs(i * parts - k * n)) for k in range(1, parts)})
    bounds = [0, *cuts, n]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


# Each level is tried only on a part the previous level left over the budget.
_LEVELS: tuple[Callable[[str, str], list[str]], ...] = (_clauses, _words, _char_cuts)


@dataclass
class _Atom:
    """A unit the packer moves around: `text` of segment number `seg` in language `language`."""

    seg: int
    language: str
    text: str
    cost: int
    prefix: str = ""  # mix only: text outside tags just before this segment's first atom
    suffix: str = ""  # mix only: text outside tags after the last segment (on the last atom)


class _Splitter:
    def __init__(self, language: str, budget: int) -> None:
        self.language = language  # "en" | "zh" | "ja" | "mix"
        self.budget = budget

    def cost(self, piece: str) -> int:
        try:
            return len(phonemize(piece, self.language).ids)
        except VallexError as err:
            if err.reason == "EMPTY_TEXT":
                return 0  # punctuation or symbols alone: merged into a neighbour, never dropped
            raise

    def _wrap(self, language: str, text: str) -> str:
        if self.language != "mix":
            return text
        tag = f"[{segments.LANGUAGE_TO_TAG[language]}]"
        return f"{tag}{text}{tag}"

    def atomize(self, seg: int, language: str, text: str) -> list[_Atom]:
        atoms: list[_Atom] = []
        for sentence in sentences(text, language):
            atoms.extend(self._fit(seg, language, sentence, 0))
        return atoms

    def _fit(self, seg: int, language: str, text: str, level: int, cost: int | None = None) -> list[_Atom]:
        """Atoms for `text`: itself if it fits, else its parts at cut level `level` or deeper."""
        if cost is None and len(text) <= _MEASURE_CHARS_PER_TOKEN * self.budget:
            cost = self.cost(self._wrap(language, text))
        # Longer text is not measured: it is over the budget in any language that speaks it, and
        # OpenJTalk's time grows with the square of an unpunctuated run. A text that was in fact
        # silent (emoji, marks) only gets cut more finely, and packing puts it back together.
        if level == len(_LEVELS):  # uncuttable (e.g. one long number): stays whole, measured
            if cost is None:
                cost = self.cost(self._wrap(language, text))
            return [_Atom(seg, language, text, cost)]
        if cost is not None and cost <= self.budget:
            return [_Atom(seg, language, text, cost)]
        split = _LEVELS[level]
        if split is _char_cuts:
            # As many parts as the cost asks for, so a huge run is not halved log(n) times
            # (each halving re-phonemizes all of it); parts still over budget are cut again.
            estimate = cost if cost is not None else len(text)
            parts = _char_cuts(text, language, max(2, math.ceil(estimate / self.budget)))
        else:
            parts = split(text, language)
        if len(parts) == 1:
            return self._fit(seg, language, text, level + 1, cost)
        # Parts of a clause or word cut hold no more cuts of that kind; character cuts may recur.
        next_level = level if split is _char_cuts else level + 1
        atoms: list[_Atom] = []
        for part in parts:
            atoms.extend(self._fit(seg, language, part, next_level))
        return atoms

    def render(self, atoms: list[_Atom]) -> str:
        if self.language != "mix":
            return "".join(a.text for a in atoms)
        out: list[str] = []
        i = 0
        while i < len(atoms):
            j = i
            while j < len(atoms) and atoms[j].seg == atoms[i].seg:
                j += 1
            body = "".join(a.text for a in atoms[i:j])
            out.append(atoms[i].prefix + self._wrap(atoms[i].language, body) + atoms[j - 1].suffix)
            i = j
        return "".join(out)

    def pack(self, atoms: list[_Atom], short_first: bool = False) -> list[str]:
        """Greedy packing on the sum of atom costs (+1 per join for the word gap), then a real
        measurement of each piece; a piece that measures over budget is cut in two again.

        An atom with nothing to speak never starts a piece, so every piece has something to say.
        `short_first`: when the text needs more than one piece anyway, the first piece is packed to
        a third of the budget only (~40 tokens, ~3 s of speech): its first sentence alone, or its
        first clauses or words when that sentence is long, so its audio comes quickly.
        """
        if short_first and len(self._groups(atoms)) > 1:
            first = self._groups(atoms, max(self.budget // 3, 1))[0]
            rest = atoms[len(first):]
            if any(a.cost for a in rest):
                return self._verified(first) + self.pack(rest)
        pieces: list[str] = []
        for group in self._groups(atoms):
            pieces.extend(self._verified(group))
        return pieces

    def _groups(self, atoms: list[_Atom], budget: int | None = None) -> list[list[_Atom]]:
        budget = budget or self.budget
        groups: list[list[_Atom]] = []
        current: list[_Atom] = []
        estimate = 0
        for atom in atoms:
            if estimate and atom.cost and estimate + atom.cost + 1 > budget:
                groups.append(current)
                current, estimate = [], 0
            current.append(atom)
            if atom.cost:
                estimate += atom.cost + (1 if estimate else 0)
        if current:
            groups.append(current)
        return groups

    def _verified(self, group: list[_Atom]) -> list[str]:
        piece = self.render(group)
        speaking = [i for i, atom in enumerate(group) if atom.cost]
        if len(speaking) < 2 or self.cost(piece) <= self.budget:
            return [piece]
        cut = speaking[len(speaking) // 2]  # silent atoms stay with the speaking atom before them
        return self._verified(group[:cut]) + self._verified(group[cut:])


def _merge_silent(atoms: list[_Atom]) -> list[_Atom]:
    """Fold atoms with nothing to speak (a lone "……", an emoji) into the atom before them in
    the same segment, so punctuation stays attached to its words."""
    out: list[_Atom] = []
    for atom in atoms:
        if atom.cost == 0 and out and out[-1].seg == atom.seg and not atom.prefix:
            out[-1].text += atom.text
            out[-1].suffix = atom.suffix
        else:
            out.append(atom)
    return out


def split_text(text: str, language: str, *, budget: int = DEFAULT_PHONEME_BUDGET,
               short_first: bool = False) -> list[str]:
    """Pieces of `text`, each within `budget` tokens when phonemized (see the module docstring).

    Raises the same errors as `phonemize` (UNKNOWN_LANGUAGE, BAD_MIX_TAGS, EMPTY_TEXT) and
    InvalidArgument(reason="BAD_BUDGET"). Every piece has something to say (no piece is only
    punctuation). A piece may exceed the budget only when it cannot be cut: a single character
    whose phonemes alone do, or a unit whose punctuation marks (which cannot stand alone as a
    piece) push it over; without those marks it fits.  `short_first`: see `_Splitter.pack` (the
    daemon uses it so the first audio of a long text comes after one sentence).
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < MIN_PHONEME_BUDGET:
        raise InvalidArgument(
            f"phoneme budget must be an integer >= {MIN_PHONEME_BUDGET}, got {short_repr(budget)}",
            reason="BAD_BUDGET",
        )
    cleaned = check_request(text, language)
    if language == "mix":
        splitter = _Splitter("mix", budget)
        atoms: list[_Atom] = []
        for index, (outside, seg) in enumerate(segments.parse_mix(text)):
            if seg is None:  # text after the last segment: not spoken, but kept in place
                atoms[-1].suffix = outside
                continue
            seg_atoms = splitter.atomize(index, seg.language, seg.text) or [_Atom(index, seg.language, "", 0)]
            seg_atoms[0].prefix = outside
            atoms.extend(seg_atoms)
    else:
        resolved = segments.detect(cleaned) if language == "auto" else language
        splitter = _Splitter(resolved, budget)
        atoms = splitter.atomize(0, resolved, text)
    if not any(a.cost for a in atoms):
        raise InvalidArgument("text has nothing to speak (no letters or words)", reason="EMPTY_TEXT")
    return splitter.pack(_merge_silent(atoms), short_first)
