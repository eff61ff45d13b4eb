"""The VALL-E X text front end: request text → phoneme ids and per-token languages.

Public API (docs/architecture.md, "Text front end"):

    REQUEST_LANGUAGES, Phonemes, phonemize(), token_languages(), split_text(),
    DEFAULT_PHONEME_BUDGET, detect_language(), warm_up()

Importing this package is cheap: jieba, pypinyin, cn2an, OpenJTalk, the CMU
dictionary, inflect and langid load lazily, once per process, on first use
(or in warm_up()), and are safe to reach from several threads.
"""

from __future__ import annotations

from vallexd.text.frontend import (
    ACCENTS,
    REQUEST_LANGUAGES,
    Phonemes,
    detect_language,
    phonemize,
    token_languages,
    warm_up,
)
from vallexd.text.split import DEFAULT_PHONEME_BUDGET, split_text

__all__ = [
    "ACCENTS",
    "DEFAULT_PHONEME_BUDGET",
    "REQUEST_LANGUAGES",
    "Phonemes",
    "detect_language",
    "phonemize",
    "split_text",
    "token_languages",
    "warm_up",
]
