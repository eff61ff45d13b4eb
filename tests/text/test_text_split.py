"""Long-text splitting: round trips (nothing dropped or reordered), budget, sentence conventions."""

from __future__ import annotations

import itertools
import random
import re
import unicodedata

import pytest

from vallexd.errors import InvalidArgument
from vallexd.text import DEFAULT_PHONEME_BUDGET, phonemize, split_text
from vallexd.text.segments import TAG_RE, parse_mix
from vallexd.text.split import MIN_PHONEME_BUDGET, number_spans, sentences

WS = re.compile(r"\s+")


def cost(piece: str, language: str) -> int:
    return len(phonemize(piece, language).ids)


def strip_marks(piece: str) -> str:
    """The piece without punctuation (keeps tags)."""
    return "".join(ch for ch in piece if ch in "[]" or not unicodedata.category(ch).startswith("P"))


def char_languages(mix_text: str) -> list[tuple[str, str | None]]:
    """Every character of mix text, without tags, with its segment language (None outside tags)."""
    out: list[tuple[str, str | None]] = []
    for outside, seg in parse_mix(mix_text):
        out.extend((ch, None) for ch in outside)
        if seg is not None:
            out.extend((ch, seg.language) for ch in seg.text)
    return out


def contains_only_numbers(inner: str) -> bool:
    """True when every speakable character of `inner` lies inside one uncuttable number."""
    spans = number_spans(inner)
    return bool(spans) and all(
        any(a <= i < b for a, b in spans) for i, ch in enumerate(inner) if ch.isalnum())


def check_split(text: str, language: str, budget: int) -> list[str]:
    """Split and check every property; returns the pieces."""
    pieces = split_text(text, language, budget=budget)
    assert pieces and all(pieces)
    assert split_text(text, language, budget=budget) == pieces  # deterministic
    measure_as = "mix" if language == "mix" else language
    if language == "auto":
        from vallexd.text import detect_language

        measure_as = detect_language(text)
    if language == "mix":
        # Round-trip rule for mix: without tags, the join is the input without tags, exactly,
        # and every character keeps its segment's language; each piece is valid mix text.
        joined = "".join(pieces)
        assert TAG_RE.sub("", joined) == TAG_RE.sub("", text)
        assert [c for c in char_languages(joined) if c[1]] == [c for c in char_languages(text) if c[1]]
        for piece in pieces:
            parse_mix(piece)
    else:
        assert "".join(pieces) == text  # exact, whitespace included
    for piece in pieces:
        n = cost(piece, measure_as)  # every piece has something to say (no EMPTY_TEXT)
        inner = TAG_RE.sub("", piece).strip() if language == "mix" else piece.strip()
        # Over budget only if it cannot be cut: one character, one number (with its currency,
        # separators and unit), or marks glued to their words.
        assert (n <= budget or len(inner) == 1 or cost(strip_marks(piece), measure_as) <= budget
                or contains_only_numbers(inner)), (piece, n)
    return pieces


# ---------------------------------------------------------------- fixed texts

EN = (
    "Mr. Smith went to Washington on the 4th of July. He said: \"This is great!\" Then he left... "
    "Dr. J. K. Rowling wrote 7 books, e.g. this one, and it sold 1,250,000 copies; remarkable.\n"
    "A new paragraph starts here, and it is a rather long sentence without any full stop but with "
    "many commas, clauses, and words that keep going and going until the budget is clearly exceeded "
    "by a wide margin and the splitter has to cut at commas or even at spaces to make it fit"
)
ZH = (
    "你好，世界。今天是2023年5月1日。他说：“今天很冷。”我们走吧！\n"
    "这是一个非常非常长的句子没有任何标点符号我们需要把它切开否则模型会说不完而且还会越说越快最后什么都听不清楚"
    "……真的吗？是的。电话号码是13800138000，请记下来。"
)
JA = (
    "今日の天気もいいですね。「一緒に出かけますか？」と彼は言った。東京タワーは333メートルです！\n"
    "これは句読点がまったくない非常に長い文章でありモデルが一度に話せる長さを大きく超えているので"
    "分割しなければならないのですがどこで切るのが良いのでしょうか"
)
MIX = (
    "[EN]Hello, how are you today? I am fine, thank you. And you?[EN]"
    "[ZH]你好，世界。今天是2023年5月1日。我们走吧！[ZH] — "
    "[JA]今日の天気もいいですね。一緒に出かけますか。[JA] …"
)


@pytest.mark.parametrize("budget", [MIN_PHONEME_BUDGET, 40, DEFAULT_PHONEME_BUDGET])
@pytest.mark.parametrize(
    ("text", "language"), [(EN, "en"), (ZH, "zh"), (JA, "ja"), (MIX, "mix"), (EN, "auto")]
)
def test_round_trip_and_budget(text: str, language: str, budget: int) -> None:
    pieces = check_split(text, language, budget)
    assert len(pieces) > 1


def test_short_text_stays_one_piece() -> None:
    for text, language in [("Hello there. How are you?", "en"), ("你好。再见。", "zh"),
                           ("はい。いいえ。", "ja"), ("[EN]Hi.[EN][ZH]你好。[ZH]", "mix")]:  # fmt: skip
        assert split_text(text, language) == [text]


def test_mix_piece_reopens_the_cut_segment() -> None:
    text = "[ZH]你好，世界。今天是星期一。我们走吧！[ZH]"
    pieces = check_split(text, "mix", 30)
    assert all(p.startswith("[ZH]") and p.endswith("[ZH]") for p in pieces)
    assert "".join(p[4:-4] for p in pieces) == text[4:-4]


def test_outside_mix_text_stays_in_place() -> None:
    text = "« [EN]One. Two. Three.[EN] - [JA]はい。[JA] »"
    pieces = check_split(text, "mix", MIN_PHONEME_BUDGET)
    joined = "".join(pieces)
    assert joined.startswith("« [EN]") and joined.endswith("[JA]はい。[JA] »")
    assert " - [JA]" in joined


def _budget_for(*parts: str, language: str) -> int:
    """A budget that fits each part alone but not two together."""
    budget = max(cost(p, language) for p in parts)
    assert all(cost(a + b, language) > budget for a, b in itertools.pairwise(parts))
    return max(budget, MIN_PHONEME_BUDGET)


def test_english_sentences_respect_abbreviations_and_initials() -> None:
    s1 = "Dr. Smith met Mr. J. K. Rowling at 3.30 p.m. yesterday. "
    s2 = "They talked for hours about St. Louis and the U.S. economy. "
    s3 = "Then everyone went home to sleep after a long and tiring day in town."
    assert check_split(s1 + s2 + s3, "en", _budget_for(s1, s2, s3, language="en")) == [s1, s2, s3]


def test_chinese_sentences_keep_quotes_whole() -> None:
    s1 = "他说：“今天很冷。”我们走吧！"
    s2 = "好的，我们现在就出发去车站吧……"
    s3 = "你真的想要现在就离开这里吗？"
    pieces = check_split(s1 + s2 + s3, "zh", _budget_for(s1, s2, s3, language="zh"))
    assert pieces[0] == s1  # the quote's 。 does not end the sentence


def test_japanese_sentences_keep_quotes_whole() -> None:
    quoted = "「行きましょう！」と彼は言った。"
    assert sentences(quoted + "はい。", "ja") == [quoted, "はい。"]
    assert sentences("一行目\n二行目。三", "ja") == ["一行目\n", "二行目。", "三"]


def test_long_sentence_cut_at_commas_before_spaces() -> None:
    text = "first part of it, second part of it, third part of it, fourth part of it"
    pieces = check_split(text, "en", 30)
    assert all(p.endswith(", ") for p in pieces[:-1])


def test_char_cuts_avoid_numbers_and_latin_words() -> None:
    text = "他的电话号码是13800138000我们明天下午三点在北京饭店见面然后一起去看电影ABCD好不好"
    assert cost("13800138000", "zh") <= 64  # the number fits alone: it must not be cut
    pieces = check_split(text, "zh", 64)
    assert len(pieces) > 2
    for left, right in itertools.pairwise(pieces):
        assert not (left[-1].isdigit() and right[0].isdigit())
        assert not (left[-1].isascii() and left[-1].isalpha() and right[0].isascii() and right[0].isalpha())


def test_punctuation_only_sentences_are_kept() -> None:
    text = "Hello. ... ... !!! World. ?? Again."
    pieces = check_split(text, "en", MIN_PHONEME_BUDGET)
    assert "".join(pieces) == text
    text = "你好。。。。……！！好的。"
    assert "".join(check_split(text, "zh", MIN_PHONEME_BUDGET)) == text


def test_single_huge_word_is_cut() -> None:
    check_split("x" * 600, "en", 40)
    check_split("長" * 300, "ja", 40)


# ---------------------------------------------------------------- random inputs

_ATOMS = {
    "en": ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Dr.", "Mr.", "J.", "42", "1999",
           "3.50", "$12", "hello", "world", "it's", "e.g.", "supercalifragilistic"],
    "zh": ["你好", "世界", "我们", "今天", "天气", "非常", "好", "学习", "中文", "电话", "号码", "123",
           "2023年", "北京", "ABC", "的", "了"],
    "ja": ["今日", "天気", "いい", "です", "ね", "一緒", "に", "出かけ", "ます", "か", "東京", "タワー", "は",
           "メートル", "333", "の", "を"],
}  # fmt: skip
_PUNCT = {
    "en": [" ", " ", " ", ", ", ". ", "! ", "? ", "... ", "; ", ": ", " - ", "\n", "\"", "(", ") ", "  "],
    "zh": ["", "", "，", "。", "！", "？", "……", "、", "“", "”", "《", "》", "\n", " ", "：", "；"],
    "ja": ["", "", "、", "。", "！", "？", "…", "「", "」", "\n", " ", "（", "）"],
}


def random_text(rng: random.Random, language: str, length: int) -> str:
    parts: list[str] = []
    while sum(map(len, parts)) < length:
        parts.append(rng.choice(_ATOMS[language]))
        if rng.random() < 0.45:
            parts.append(rng.choice(_PUNCT[language]))
        elif language == "en":
            parts.append(" ")
    return "".join(parts)


def random_mix(rng: random.Random, length: int) -> str:
    out = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.3:
            out.append(rng.choice([" ", " - ", "\n", "…"]))
        language = rng.choice(["en", "zh", "ja"])
        tag = f"[{language.upper()}]"
        out.append(tag + random_text(rng, language, length // 3) + tag)
    return "".join(out)


@pytest.mark.parametrize("language", ["en", "zh", "ja", "mix"])
def test_random_inputs_round_trip(language: str) -> None:
    rng = random.Random(f"split-{language}")
    for _ in range(12):
        length = rng.choice([5, 40, 150, 400])
        budget = rng.choice([MIN_PHONEME_BUDGET, 33, 60, DEFAULT_PHONEME_BUDGET])
        text = random_mix(rng, length) if language == "mix" else random_text(rng, language, length)
        try:
            phonemize(text, language)
        except InvalidArgument as err:
            assert err.reason == "EMPTY_TEXT"
            with pytest.raises(InvalidArgument, match=r"nothing to speak|empty"):
                split_text(text, language, budget=budget)
            continue
        check_split(text, language, budget)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "language", "budget", "reason"),
    [
        ("", "en", 120, "EMPTY_TEXT"),
        ("... !!! ???", "en", 120, "EMPTY_TEXT"),
        ("。。。", "zh", 120, "EMPTY_TEXT"),
        ("hello", "xx", 120, "UNKNOWN_LANGUAGE"),
        ("[EN]hello", "mix", 120, "BAD_MIX_TAGS"),
        ("no tags", "mix", 120, "BAD_MIX_TAGS"),
        ("hello", "en", MIN_PHONEME_BUDGET - 1, "BAD_BUDGET"),
        ("hello", "en", 12.5, "BAD_BUDGET"),
        ("hello", "en", True, "BAD_BUDGET"),
    ],
)
def test_split_errors(text: str, language: str, budget: object, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        split_text(text, language, budget=budget)  # type: ignore[arg-type]
    assert err.value.reason == reason


def test_whitespace_only_differences_round_trip() -> None:
    text = "  One sentence here.\n\n\tAnother one there.  \r\n Last.  "
    pieces = check_split(text, "en", MIN_PHONEME_BUDGET)
    assert WS.sub("", "".join(pieces)) == WS.sub("", text)


def test_short_first_piece_only_when_the_text_needs_several_pieces() -> None:
    text = "Go home now. Be very calm. It is fine. The sky is blue today."
    assert split_text(text, "en", budget=120, short_first=True) == [text]  # one piece stays one
    plain = split_text(text, "en", budget=30)
    short = split_text(text, "en", budget=30, short_first=True)
    assert short[0] == "Go home now. " and plain[0] != short[0]
    assert "".join(short) == text == "".join(plain)
    assert all(len(phonemize(p, "en").ids) <= 30 for p in short)
    zh = "今天天气很好。我们去公园散步吧！然后一起吃晚饭。"  # 36 + 37 + 36 tokens
    assert split_text(zh, "zh", budget=80) == ["今天天气很好。我们去公园散步吧！", "然后一起吃晚饭。"]
    assert split_text(zh, "zh", budget=80, short_first=True) == [
        "今天天气很好。", "我们去公园散步吧！然后一起吃晚饭。"]
