"""Make a voice preset (.npz bytes) from a short recording and its transcript.

This is the only part of vallexctl that needs torch (EnCodec) and the text
front end; the CLI imports this module only for `preset install --from-audio`.
The length limit is checked from the file header first, so a too-long
recording is refused before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path

from vallexd.constants import ENCODEC_FILE
from vallexd.errors import InvalidArgument, NotFound, TooLarge


def default_encodec_path() -> Path:
    """EnCodec in the models folder; when only the demo weights (`quickstart --demo`) have it, theirs."""
    from vallexctl.model_files import demo_dir, is_demo
    from vallexd.config import default_paths

    models_dir = default_paths().models_dir
    real = models_dir / ENCODEC_FILE
    demo = demo_dir(models_dir) / ENCODEC_FILE
    return demo if not real.is_file() and demo.is_file() and is_demo(demo.parent) else real


def check_duration(wav: Path, max_seconds: float) -> float:
    """Seconds of audio in `wav` from its header; TooLarge over `max_seconds`."""
    import soundfile as sf

    try:
        info = sf.info(str(wav))
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise InvalidArgument(f"cannot read audio file {wav}: {exc}", reason="BAD_AUDIO") from None
    seconds = info.frames / info.samplerate if info.samplerate else 0.0
    if seconds > max_seconds:
        raise TooLarge(
            f"{wav} is {seconds:.1f} s long; a voice prompt may be at most {max_seconds:.0f} s "
            "(cut a clean 3-10 s sentence out of it)",
            reason="PROMPT_TOO_LONG",
        )
    return seconds


def prompt_bytes_from_audio(wav: Path, transcript: str, language: str, *, encodec_path: Path | None,
                            max_seconds: float = 15.0) -> bytes:
    """EnCodec codes of `wav` + phoneme ids of `transcript` -> a validated .npz file's bytes."""
    check_duration(wav, max_seconds)
    encodec_path = encodec_path or default_encodec_path()
    if not encodec_path.is_file():
        raise NotFound(
            f"EnCodec weights not found at {encodec_path}: run `vallexctl models fetch` "
            "or pass --encodec PATH",
            reason="CODEC_NOT_FOUND",
        )
    # The text first: it is cheap and its errors (empty, unknown language) are the user's to fix.
    from vallexd.text import phonemize

    ph = phonemize(transcript, language)
    if ph.language not in ("en", "zh", "ja"):
        raise InvalidArgument(
            f"the transcript reads as {ph.language!r}; a prompt has one language: "
            "pass --language en, zh or ja",
            reason="BAD_PROMPT_LANGUAGE",
        )

    import numpy as np

    from vallexd.inference.encodec import AudioTokenizer
    from vallexd.storage.prompts import Prompt, prompt_to_bytes, validate_arrays

    codes = AudioTokenizer.load(encodec_path, device="cpu").encode_file(wav)  # (1, T, 8) int64
    text = np.asarray([ph.ids], dtype=np.int64)
    from vallexd.constants import LANG_CODES

    prompt: Prompt = validate_arrays(codes, text, np.asarray(LANG_CODES[ph.language]), wav.name)
    return prompt_to_bytes(prompt)
