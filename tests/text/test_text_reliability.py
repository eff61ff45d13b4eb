"""Front-end faults of issue 12 (kinds 2, 3, 11, 12), without ../shared; each example with its value."""

from __future__ import annotations

import unicodedata

import pytest

from vallexd.text import phonemize, split_text
from vallexd.text.normalize import normalize_text

LINE_BREAKS = ["\r\n", "\n", "\r", "\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


@pytest.mark.parametrize("brk", LINE_BREAKS, ids=[repr(b) for b in LINE_BREAKS])
def test_every_line_break_is_a_word_boundary(brk: str) -> None:
    # issue 12, fault 2: "ɹedviolets*" (one unknown word spelled out) before.
    ph = phonemize(f"Roses are red{brk}Violets are blue", "en")
    assert ph.phonemes == "ˈɹoʊzɪz_əɹ_ɹɛd_ˈvaɪələts_əɹ_blu."
    assert "*" not in ph.phonemes
    assert phonemize(f"你好{brk}世界", "zh") == phonemize("你好 世界", "zh")
    assert phonemize(f"今日は{brk}晴れ", "ja") == phonemize("今日は 晴れ", "ja")


def test_normalisation_is_one_idempotent_canonical_form() -> None:
    nfd = unicodedata.normalize("NFD", "パンを食べます。")
    assert nfd != "パンを食べます。"
    assert normalize_text(nfd) == "パンを食べます。"
    # the front end reads the two alike (h_aN… before, from the decomposed ハ + ゚)
    assert phonemize(nfd, "ja") == phonemize("パンを食べます。", "ja")
    for text in ["a\r\n\r\nb", "  x \u2028 y  ", "我爱你❤️中国", "a\u200d\u0303b", nfd, "1️⃣ 👨‍👩‍👧 ok"]:
        once = normalize_text(text)
        assert normalize_text(once) == once
    assert normalize_text("a \r\n\t b") == "a\nb"
    assert normalize_text("a \t  b") == "a b"


def test_pounds_with_pence_read_like_dollars_with_cents() -> None:
    # issue 12, fault 12: "θɹi_pounds.fifty*" before.
    assert phonemize("It costs £3.50.", "en").phonemes == "ɪt_kɔsts_θɹi_paʊnz,_ˈfɪfti_pɛns."
    assert phonemize("£1.01", "en").phonemes == phonemize("one pound, one penny", "en").phonemes
    assert phonemize("£1,250", "en").phonemes == phonemize("1250 pounds", "en").phonemes
    assert phonemize("$3.50", "en").phonemes == phonemize("three dollars, fifty cents", "en").phonemes


EMOJI = ["❤️", "👍🏽", "👨‍👩‍👧", "1️⃣", "#️⃣", "🇨🇳", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "☺︎", "©️", "😀"]


@pytest.mark.parametrize("emoji", EMOJI)
@pytest.mark.parametrize(("before", "after", "language"), [
    ("我爱你", "中国", "zh"), ("I love ", " you", "en"), ("愛してる", "よ", "ja"),
])
def test_whole_emoji_sequences_are_dropped_in_every_language(emoji: str, before: str, after: str,
                                                             language: str) -> None:
    # issue 12, fault 12: 我爱你❤️中国 kept U+FE0F → [UNK].
    ph = phonemize(before + emoji + after, language)
    assert ph == phonemize(before + after, language)
    assert 0 not in ph.ids


def test_numbers_are_never_cut() -> None:
    # issue 12, fault 11: cut as "…$31,419,689" | ",421,557.31…" on the default path.
    text = "U.S. federal debt reached $31,419,689,421,557.31 on January 19, 2023."
    for budget in (16, 40, 120):
        pieces = split_text(text, "en", budget=budget)
        assert "".join(pieces) == text
        assert any("$31,419,689,421,557.31" in p for p in pieces), pieces
    assert split_text(text, "en") == ["U.S. federal debt reached ", "$31,419,689,421,557.31 ",
                                      "on January 19, 2023."]
    # A number alone over the budget stays whole, in every language.
    assert split_text("9" * 60, "en", budget=16) == ["9" * 60]
    zh = split_text("我们的债务是31419689421557.31元，这很多。", "zh", budget=16)
    assert any("31419689421557.31" in p for p in zh)
    for number in ("12.5%", "£1,250.50", "-3,000", "1'000'000"):
        pieces = split_text(f"Pay {number} now or later, please, friend.", "en", budget=16)
        assert any(number in p for p in pieces), (number, pieces)
