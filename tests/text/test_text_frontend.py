"""The text front end: reference compatibility (g2p.jsonl), own sentences, errors, accents, threads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest
from conftest import REFERENCE, ROOT, require_shared

from vallexd.errors import InvalidArgument, TooLarge, VallexError
from vallexd.text import (
    REQUEST_LANGUAGES,
    Phonemes,
    detect_language,
    phonemize,
    token_languages,
    warm_up,
)
from vallexd.text import check as g2p_check
from vallexd.text.vocab import SYMBOLS, VOCAB_SIZE, phoneme_ids

G2P_CASES = REFERENCE / "g2p.jsonl"

#: Cases of g2p.jsonl we knowingly do not reproduce: text → why. Empty: all 1,660 match
#: (phonemes, ids and langs). A mismatch of a case not listed here fails the test, and so
#: does a listed case that has started to match (the entry is stale).
KNOWN_DIFFERENCES: dict[str, str] = {}

# Our own sentences, in none of the reference cases.
OWN_SENTENCES: list[tuple[str, str]] = [
    ("The committee postponed its decision until the 3rd of March, 2031.", "en"),
    ("She sells sea shells by the sea shore; isn't that lovely?", "en"),
    ("Mrs. Jones paid $12.75 at St. Mary's for 1,250 leaflets.", "en"),
    ("我们明天早上八点在图书馆门口见面，别迟到！", "zh"),
    ("这本书一共有365页，我已经读了一半。", "zh"),
    ("请把窗户关上，外面下雨了。", "zh"),
    ("明日は朝から雨が降るそうです。傘を忘れないでください。", "ja"),
    ("この店のラーメンは本当に美味しいですね！", "ja"),
    ("電車が10分遅れています。", "ja"),
    ("[EN]Good morning everyone.[EN][ZH]今天我们学习中文。[ZH][JA]よろしくお願いします。[JA]", "mix"),
    ("[ZH]他说[ZH][EN]see you later[EN][ZH]然后就走了。[ZH]", "mix"),
    ("Where is the nearest train station?", "auto"),
    ("我想喝一杯热茶。", "auto"),
    ("お茶を一杯ください。", "auto"),
]


def _load_cases() -> list[dict]:
    require_shared(G2P_CASES)
    return g2p_check.load_cases(G2P_CASES)


# ---------------------------------------------------------------- reference compatibility


def test_vocabulary_matches_the_contract_table() -> None:
    assert VOCAB_SIZE == 70
    assert SYMBOLS[:5] == ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
    assert phoneme_ids("_") == (16,) and phoneme_ids("↓") == (69,) and phoneme_ids("θ") == (64,)
    assert phoneme_ids("ɻ😀") == (0, 0)  # outside the vocabulary → [UNK]


def test_g2p_reference_cases_match_exactly() -> None:
    cases = _load_cases()
    assert len(cases) == 1660
    mismatched: dict[str, str] = {}
    for case in cases:
        problem = g2p_check.compare(case)
        if problem is not None:
            mismatched[case["text"]] = problem
    unexpected = {t: p for t, p in mismatched.items() if t not in KNOWN_DIFFERENCES}
    stale = [t for t in KNOWN_DIFFERENCES if t not in mismatched]
    assert not unexpected, f"unlisted mismatches: {unexpected}"
    assert not stale, f"listed as different but now matching: {stale}"
    assert len(cases) - len(mismatched) >= 0.99 * len(cases)


def test_check_main_reports_mismatches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _load_cases()[:3]
    bad = dict(good[0], phonemes="xyz", ids=[38, 39, 40])
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in [*good, bad]), encoding="utf-8")
    assert g2p_check.main(path) == 1  # 3/4 < 99%
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "3/4 cases match"
    assert any(line.startswith("expected: xyz") for line in out)
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in good), encoding="utf-8")
    assert g2p_check.main(path) == 0
    assert g2p_check.main(tmp_path / "missing.jsonl") == 2


def test_reference_cli_g2p_subcommand(tmp_path: Path) -> None:
    """`python -m vallexd.reference g2p` (the alias of vallexd.tools.conformance) end to end, on a
    sample of the cases (every sentence and language; the test above runs all 1,660 in-process),
    plus one wrong case."""
    cases = _load_cases()
    sample = [c for c in cases if "note" not in c] + [c for c in cases if "note" in c][::50]
    path = tmp_path / "sample.jsonl"
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in sample), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "vallexd.reference", "g2p", str(path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [f"{len(sample)}/{len(sample)} cases match"]


# ---------------------------------------------------------------- own sentences


def _as_json(ph: Phonemes) -> dict:
    return {"phonemes": ph.phonemes, "ids": list(ph.ids), "langs": list(ph.langs), "language": ph.language}


@pytest.mark.parametrize(("text", "language"), OWN_SENTENCES)
def test_own_sentences_give_consistent_output(text: str, language: str) -> None:
    ph = phonemize(text, language)
    assert ph.phonemes and len(ph.phonemes) == len(ph.ids) == len(ph.langs)
    # [UNK] only for punctuation outside the vocabulary (";" here), as in the reference: the
    # model was trained on the same front end, so it has seen such tokens.
    unknown = [ch for ch, i in zip(ph.phonemes, ph.ids, strict=True) if i == 0]
    assert all(unicodedata.category(ch).startswith("P") for ch in unknown), unknown
    assert ph.phonemes[-1] in ".,!?-…~"
    assert phonemize(text, language) == ph
    if language == "mix":
        assert ph.language == "mix" and len(set(ph.langs)) >= 2
    else:
        assert set(ph.langs) == {ph.language}
        assert ph.language in ("en", "zh", "ja")


def test_auto_detects_each_language() -> None:
    detected = [phonemize(t, "auto").language for t, lang in OWN_SENTENCES if lang == "auto"]
    assert detected == ["en", "zh", "ja"]
    assert detect_language("  The weather is nice today.\n") == "en"
    assert detect_language("今天天气很好。") == "zh"
    assert detect_language("今日はいい天気ですね。") == "ja"


def test_auto_equals_the_detected_language() -> None:
    text = "Where is the nearest train station?"
    assert phonemize(text, "auto") == phonemize(text, "en")


def test_mix_allows_punctuation_outside_tags_and_tags_each_segment() -> None:
    ph = phonemize(" - [EN]Hello[EN] ,  [ZH]你好[ZH] 。", "mix")
    assert ph == phonemize("[EN]Hello[EN][ZH]你好[ZH]", "mix")
    en = phonemize("Hello", "en")
    zh = phonemize("你好", "zh")
    assert ph.phonemes == en.phonemes + zh.phonemes
    assert ph.langs == en.langs + zh.langs
    # an empty segment contributes nothing
    assert phonemize("[JA][JA][EN]Hello[EN]", "mix").phonemes == en.phonemes


def test_mix_refuses_untagged_words_quoting_them() -> None:
    # issue 12, fault 5: the old API's example; こんにちは would silently not be spoken.
    with pytest.raises(InvalidArgument) as info:
        phonemize("[ZH]你好，用日语说是[ZH]こんにちは", "mix")
    assert info.value.reason == "BAD_MIX_TAGS"
    assert "'こんにちは'" in info.value.message and info.value.details["position"] == 16
    for text in ("lead [EN]Hi[EN]", "[EN]Hi[EN] middle [ZH]你好[ZH]", "[EN]Hi[EN]42"):
        with pytest.raises(InvalidArgument, match="untagged"):
            phonemize(text, "mix")


def test_control_characters_dropped() -> None:
    assert phonemize("  Hello\x00 wor\x07ld\u200b  ", "en") == phonemize("Hello world", "en")
    assert phonemize("今日は\x1b[0m晴れ", "ja") == phonemize("今日は[0m晴れ", "ja")


def test_emoji_do_not_break_or_leak_unknown_tokens() -> None:
    for text, language in [("Hello 😀 world 👍", "en"), ("你好😀世界", "zh"), ("こんにちは😀", "ja")]:
        ph = phonemize(text, language)
        assert 0 not in ph.ids and ph.phonemes


def test_large_numbers_do_not_crash() -> None:
    # cn2an stops at 16 digits and inflect near 10^33: both fall back to reading digits
    zh = phonemize("号码是" + "9" * 40 + "。", "zh")
    assert zh.phonemes.count("tʃ⁼joʊ↓↑") == 40
    en = phonemize("It costs $" + "9" * 50 + ".99 and 1" + "0" * 40 + "th", "en")
    assert en.phonemes.count("naɪn") >= 50


def test_subprocess_threads_same_output_and_one_load_each() -> None:
    """A fresh process, six threads phonemizing at once from a cold start: same output as this
    process (determinism), and each heavy resource loaded exactly once (thread-safe lazy load)."""
    script = textwrap.dedent(
        """
        import json, sys, threading
        from vallexd.text import phonemize
        from vallexd.text import english, mandarin, japanese, segments
        items = json.loads(sys.stdin.read())
        results = [None] * len(items)
        barrier = threading.Barrier(6)
        def work(k):
            barrier.wait()
            for i in range(k, len(items), 6):
                ph = phonemize(*items[i])
                results[i] = {"phonemes": ph.phonemes, "ids": list(ph.ids), "langs": list(ph.langs),
                              "language": ph.language}
        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for t in threads: t.start()
        for t in threads: t.join()
        lazies = [english.CMU, english.INFLECT, mandarin.JIEBA, mandarin.PINYIN, mandarin.CN2AN,
                  japanese.OPENJTALK, segments.LANGID]
        print(json.dumps({"results": results, "loads": {z.name: z.load_count for z in lazies}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(OWN_SENTENCES), capture_output=True,
        text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])  # stdout carries nothing else
    assert out["results"] == [_as_json(phonemize(t, lang)) for t, lang in OWN_SENTENCES]
    assert out["loads"] == dict.fromkeys(out["loads"], 1)


def test_warm_up_loads_once_and_reports_time() -> None:
    from vallexd.text import english, japanese, mandarin

    first = warm_up()
    assert set(first) == {"en", "zh", "ja", "auto"}
    again = warm_up(("en",))
    assert again["en"] < 0.5  # nothing reloaded: only the tiny sample sentence runs
    for lazy in (english.CMU, english.INFLECT, mandarin.JIEBA, japanese.OPENJTALK):
        assert lazy.loaded and lazy.load_count == 1
    with pytest.raises(InvalidArgument) as err:
        warm_up(("fr",))
    assert err.value.reason == "UNKNOWN_LANGUAGE"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "language", "reason"),
    [
        ("", "en", "EMPTY_TEXT"),
        ("   \n\t ", "zh", "EMPTY_TEXT"),
        ("...!?", "en", "EMPTY_TEXT"),
        ("。！？", "zh", "EMPTY_TEXT"),
        ("「」、。", "ja", "EMPTY_TEXT"),
        ("😀👍", "zh", "EMPTY_TEXT"),
        ("\x00\x01\x02", "en", "EMPTY_TEXT"),
        ("[EN]...[EN]", "mix", "EMPTY_TEXT"),
        ("hello", "fr", "UNKNOWN_LANGUAGE"),
        ("hello", "EN", "UNKNOWN_LANGUAGE"),
        ("hello", "", "UNKNOWN_LANGUAGE"),
        ("hello", None, "UNKNOWN_LANGUAGE"),
        (None, "en", "INVALID_TEXT"),
        (b"hello", "en", "INVALID_TEXT"),
        ("plain text without tags", "mix", "BAD_MIX_TAGS"),
        ("[EN]hello", "mix", "BAD_MIX_TAGS"),
        ("[EN]hello[ZH]你好[ZH]", "mix", "BAD_MIX_TAGS"),
        ("[EN]a[ZH]b[EN]c[ZH]", "mix", "BAD_MIX_TAGS"),
        ("[EN]a[EN][JA]b", "mix", "BAD_MIX_TAGS"),
    ],
)
def test_invalid_input_raises_invalid_argument(text: object, language: object, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        phonemize(text, language)  # type: ignore[arg-type]
    assert err.value.reason == reason
    assert err.value.message and err.value.code.value == "INVALID_ARGUMENT"


def test_too_long_is_rejected_before_any_heavy_work() -> None:
    """In a fresh process: a 100 kB text over max_chars fails without loading any resource."""
    script = textwrap.dedent(
        """
        import json, sys, time
        from vallexd.errors import TooLarge
        from vallexd.text import phonemize
        from vallexd.text import english, mandarin, japanese, segments
        start = time.perf_counter()
        try:
            phonemize("长" * 100_000, "zh", max_chars=5000)
        except TooLarge as err:
            reason = err.reason
        loaded = [z.name for z in (english.CMU, english.INFLECT, mandarin.JIEBA, mandarin.PINYIN,
                                   japanese.OPENJTALK, segments.LANGID) if z.loaded]
        heavy = [m for m in ("jieba", "pypinyin", "pyopenjtalk", "inflect", "langid") if m in sys.modules]
        print(json.dumps({"reason": reason, "loaded": loaded, "heavy": heavy,
                          "ms": (time.perf_counter() - start) * 1000}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["reason"] == "TEXT_TOO_LONG"
    assert out["loaded"] == [] and out["heavy"] == []


def test_too_long_error_carries_sizes() -> None:
    with pytest.raises(TooLarge) as err:
        phonemize("x" * 101, "en", max_chars=100)
    assert err.value.reason == "TEXT_TOO_LONG"
    assert err.value.details == {"field": "text", "limit": 100, "length": 101}
    assert phonemize("x" * 100, "en", max_chars=100).phonemes  # at the limit is fine


def test_100kb_inputs_are_handled() -> None:
    en = phonemize("The cat sat on the mat, 42 times. " * 3000, "en")  # ~102 kB
    assert len(en.ids) > 50_000
    junk = "".join(chr(c) for c in range(0x20, 0x3000)) * 9  # symbols, scripts, combining marks
    for language in ("en", "zh", "ja"):
        ph = phonemize(junk[:100_000], language)
        assert len(ph.ids) == len(ph.langs) == len(ph.phonemes) > 0


def test_every_error_is_a_vallex_error() -> None:
    for args in [(1, "en"), ("x", 1), ("[ZH]", "mix"), ("", "auto")]:
        with pytest.raises(VallexError):
            phonemize(*args)  # type: ignore[arg-type]


# ---------------------------------------------------------------- accents


def test_token_languages_accent_modes() -> None:
    en = phonemize("Good morning.", "en")
    mix = phonemize("[EN]Good morning.[EN][ZH]早上好。[ZH]", "mix")
    auto = phonemize("我们明天早上见面吧。", "auto")
    assert token_languages(en, "native") == ["en"] * len(en.ids)
    assert token_languages(mix, "native") == list(mix.langs)
    assert token_languages(en, "request") == "en"
    assert token_languages(auto, "request") == "zh"  # auto is resolved
    # mix has no single request language: fall back to the per-token list
    assert token_languages(mix, "request") == list(mix.langs)
    # forced accents: English spoken with a Japanese accent, etc.
    assert token_languages(en, "ja") == "ja"
    assert token_languages(mix, "zh") == "zh"
    assert token_languages(auto, "en") == "en"


@pytest.mark.parametrize("accent", ["", "fr", "NATIVE", "no-accent", None])
def test_unknown_accent(accent: object) -> None:
    with pytest.raises(InvalidArgument) as err:
        token_languages(phonemize("hi", "en"), accent)  # type: ignore[arg-type]
    assert err.value.reason == "UNKNOWN_ACCENT"


def test_request_languages_constant() -> None:
    assert REQUEST_LANGUAGES == ("en", "zh", "ja", "mix", "auto")
