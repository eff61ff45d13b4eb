"""The 70-entry phoneme vocabulary the VALL-E X checkpoint was trained with.

One token per character; characters outside the vocabulary map to id 0
(`[UNK]`), exactly as the reference tokenizer does (see TEXT-FRONTEND.md).
"""

from __future__ import annotations

#: Index = token id. The first five are special tokens; the rest are single characters.
SYMBOLS: tuple[str, ...] = (
    "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]",
    "!", "#", "*", ",", "-", ".", "=", "?", "N", "Q", "^", "_", "`",
    "a", "b", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p",
    "s", "t", "u", "v", "w", "x", "y", "z", "~", "æ", "ç", "ð", "ŋ", "ɑ", "ɔ",
    "ə", "ɛ", "ɥ", "ɪ", "ɫ", "ɯ", "ɸ", "ɹ", "ɾ", "ʃ", "ʊ", "ʑ", "ʒ", "ʰ", "ˈ",
    "ˌ", "θ", "…", "⁼", "↑", "→", "↓",
)  # fmt: skip

UNK_ID = 0
VOCAB_SIZE = len(SYMBOLS)

SYMBOL_TO_ID: dict[str, int] = {s: i for i, s in enumerate(SYMBOLS) if len(s) == 1}

#: Symbols that are sounds (as opposed to punctuation, word gaps, stress, tone and
#: aspiration marks). A text whose phonemes contain none of them is unspeakable.
SOUND_SYMBOLS: frozenset[str] = frozenset(
    "NQabdefghijklmnopstuvwxyzæçðŋɑɔəɛɥɪɫɯɸɹɾʃʊʑʒθ"
)


def phoneme_ids(phonemes: str) -> tuple[int, ...]:
    """Token ids for a phoneme string (one id per character, unknown characters → 0)."""
    return tuple(SYMBOL_TO_ID.get(ch, UNK_ID) for ch in phonemes)


def has_sound(phonemes: str) -> bool:
    """True when at least one character is a speakable sound, not only marks or punctuation."""
    return any(ch in SOUND_SYMBOLS for ch in phonemes)
