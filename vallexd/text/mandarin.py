"""Mandarin text → IPA-like phonemes with tone arrows, as the reference `chinese_to_ipa` makes them.

Arabic numerals → Chinese numerals (cn2an); `、；：` → `，`; jieba word split;
pypinyin bopomofo per word (a syllable without a tone mark gets `ˉ`, words
separated by spaces, non-Han words kept); Latin letters spelled as bopomofo;
bopomofo → IPA-like table; glide and syllabic-vowel fixes.

The table below was checked against the 1,379 single-syllable cases of the
reference `g2p.jsonl` (every syllable and tone pypinyin produces).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from vallexd.text.lazy import Lazy
from vallexd.text.normalize import drop_emoji

# Latin letters spelled with their Chinese letter names.
_LATIN_TO_BOPOMOFO = [
    (re.compile(letter, re.IGNORECASE), bopomofo)
    for letter, bopomofo in [
        ("a", "ㄟˉ"), ("b", "ㄅㄧˋ"), ("c", "ㄙㄧˉ"), ("d", "ㄉㄧˋ"), ("e", "ㄧˋ"), ("f", "ㄝˊㄈㄨˋ"),
        ("g", "ㄐㄧˋ"), ("h", "ㄝˇㄑㄩˋ"), ("i", "ㄞˋ"), ("j", "ㄐㄟˋ"), ("k", "ㄎㄟˋ"), ("l", "ㄝˊㄛˋ"),
        ("m", "ㄝˊㄇㄨˋ"), ("n", "ㄣˉ"), ("o", "ㄡˉ"), ("p", "ㄆㄧˉ"), ("q", "ㄎㄧㄡˉ"), ("r", "ㄚˋ"),
        ("s", "ㄝˊㄙˋ"), ("t", "ㄊㄧˋ"), ("u", "ㄧㄡˉ"), ("v", "ㄨㄧˉ"), ("w", "ㄉㄚˋㄅㄨˋㄌㄧㄡˋ"),
        ("x", "ㄝˉㄎㄨˋㄙˋ"), ("y", "ㄨㄞˋ"), ("z", "ㄗㄟˋ"),
    ]
]  # fmt: skip

# Applied in order: multi-letter finals before their single letters.
_BOPOMOFO_TO_IPA = [
    ("ㄅㄛ", "p⁼wo"), ("ㄆㄛ", "pʰwo"), ("ㄇㄛ", "mwo"), ("ㄈㄛ", "fwo"),
    ("ㄅ", "p⁼"), ("ㄆ", "pʰ"), ("ㄇ", "m"), ("ㄈ", "f"), ("ㄉ", "t⁼"), ("ㄊ", "tʰ"), ("ㄋ", "n"),
    ("ㄌ", "l"), ("ㄍ", "k⁼"), ("ㄎ", "kʰ"), ("ㄏ", "x"), ("ㄐ", "tʃ⁼"), ("ㄑ", "tʃʰ"), ("ㄒ", "ʃ"),
    ("ㄓ", "ts`⁼"), ("ㄔ", "ts`ʰ"), ("ㄕ", "s`"), ("ㄖ", "ɹ`"), ("ㄗ", "ts⁼"), ("ㄘ", "tsʰ"), ("ㄙ", "s"),
    ("ㄚ", "a"), ("ㄛ", "o"), ("ㄜ", "ə"), ("ㄝ", "ɛ"), ("ㄞ", "aɪ"), ("ㄟ", "eɪ"), ("ㄠ", "ɑʊ"),
    ("ㄡ", "oʊ"), ("ㄧㄢ", "jɛn"), ("ㄩㄢ", "ɥæn"), ("ㄢ", "an"), ("ㄧㄣ", "in"), ("ㄩㄣ", "ɥn"),
    ("ㄣ", "ən"), ("ㄤ", "ɑŋ"), ("ㄧㄥ", "iŋ"), ("ㄨㄥ", "ʊŋ"), ("ㄩㄥ", "jʊŋ"), ("ㄥ", "əŋ"),
    ("ㄦ", "əɻ"), ("ㄧ", "i"), ("ㄨ", "u"), ("ㄩ", "ɥ"),
    ("ˉ", "→"), ("ˊ", "↑"), ("ˇ", "↓↑"), ("ˋ", "↓"), ("˙", ""),
    ("，", ","), ("。", "."), ("！", "!"), ("？", "?"), ("—", "-"),
]  # fmt: skip

_han_re = re.compile("[\u4e00-\u9fff]")
_number_re = re.compile(r"\d+(?:\.?\d+)?")
_bare_syllable_re = re.compile("([\u3105-\u3129])$")


def _load_jieba() -> Any:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # it logs its dictionary load at INFO on every process
    jieba.initialize()
    return jieba


def _load_pinyin() -> Any:
    from pypinyin import BOPOMOFO, lazy_pinyin

    return lambda word: lazy_pinyin(word, BOPOMOFO)


def _load_cn2an() -> Any:
    import cn2an

    return cn2an.an2cn


JIEBA: Lazy[Any] = Lazy("jieba", _load_jieba)
PINYIN: Lazy[Any] = Lazy("pypinyin", _load_pinyin)
CN2AN: Lazy[Any] = Lazy("cn2an", _load_cn2an)


def warm_up() -> None:
    JIEBA.get()
    PINYIN.get()
    CN2AN.get()
    chinese_to_ipa("你好，2023年。")  # pypinyin and jieba build further caches on their first real call


_DIGITS = dict(zip("0123456789.", "零一二三四五六七八九点", strict=True))


def _number_to_chinese(number: str) -> str:
    try:
        return CN2AN.get()(number)
    except ValueError:
        # cn2an reads at most 16 digits (the reference crashed beyond): read digit by digit,
        # as one reads a phone or serial number.
        return "".join(_DIGITS.get(ch, ch) for ch in number)


def number_to_chinese(text: str) -> str:
    for number in _number_re.findall(text):
        text = text.replace(number, _number_to_chinese(number), 1)
    return text


def chinese_to_bopomofo(text: str) -> str:
    text = text.replace("、", "，").replace("；", "，").replace("：", "，")
    words = JIEBA.get().lcut(text, cut_all=False)
    to_bopomofo = PINYIN.get()
    out = ""
    for word in words:
        if not _han_re.search(word):
            out += word
            continue
        syllables = [_bare_syllable_re.sub(r"\1ˉ", s) for s in to_bopomofo(word)]
        if out != "":
            out += " "
        out += "".join(syllables)
    return out


def latin_to_bopomofo(text: str) -> str:
    for regex, replacement in _LATIN_TO_BOPOMOFO:
        text = regex.sub(replacement, text)
    return text


def bopomofo_to_ipa(text: str) -> str:
    for old, new in _BOPOMOFO_TO_IPA:
        text = text.replace(old, new)
    return text


def drop_symbols(text: str) -> str:
    """Remove emoji and other pictographic symbols (Unicode "So"). Deviation: the reference kept
    them and fed the model [UNK] tokens; English (unidecode) and Japanese (marks go through
    unidecode) already drop them, so this makes Mandarin behave the same."""
    # Whole emoji sequences (with their selectors, skin tones, ZWJ joins) are already gone
    # (normalize.drop_emoji runs on every request); this catches single symbols such as ★.
    return "".join(ch for ch in drop_emoji(text) if unicodedata.category(ch) != "So")


def chinese_to_ipa(text: str) -> str:
    """The reference Mandarin conversion."""
    text = drop_symbols(text)
    text = number_to_chinese(text)
    text = chinese_to_bopomofo(text)
    text = latin_to_bopomofo(text)
    text = bopomofo_to_ipa(text)
    text = re.sub("i([aoe])", r"j\1", text)
    text = re.sub("u([aoəe])", r"w\1", text)
    text = re.sub("([sɹ]`[⁼ʰ]?)([→↓↑ ]+|$)", r"\1ɹ`\2", text).replace("ɻ", "ɹ`")
    return re.sub("([s][⁼ʰ]?)([→↓↑ ]+|$)", r"\1ɹ\2", text)
