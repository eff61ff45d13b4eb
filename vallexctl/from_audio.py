"""Make a voice preset (.npz bytes) from a short recording, here or on the daemon.

Here (the client has the EnCodec weights and a transcript): the same steps the daemon runs
(`vallexd.voices`: decode, 15 s / clipping / silence checks, phonemes, EnCodec), then the .npz is
uploaded with `presets.install`.  Otherwise the recording itself goes to the daemon's
`presets.create`, which encodes it with its EnCodec and transcribes it with Whisper when no
transcript is given.  This module imports torch only on the local path; the length limit is
checked from the file header first, so a too-long recording is refused before anything loads.
"""

from __future__ import annotations

from pathlib import Path

from vallexd.constants import ENCODEC_FILE, MAX_PROMPT_SECONDS
from vallexd.errors import InvalidArgument, NotFound, TooLarge


def default_encodec_path() -> Path:
    """EnCodec in the models folder; when only the demo weights (`quickstart --demo`) have it, theirs."""
    from vallexctl.model_files import demo_dir, is_demo
    from vallexd.config import default_paths

    models_dir = default_paths().models_dir
    real = models_dir / ENCODEC_FILE
    demo = demo_dir(models_dir) / ENCODEC_FILE
    return demo if not real.is_file() and demo.is_file() and is_demo(demo.parent) else real


def check_duration(wav: Path, max_seconds: float) -> float | None:
    """Seconds of audio in `wav` from its header; TooLarge over `max_seconds`.

    None when soundfile cannot read the header (e.g. M4A): the decoder decides later.
    """
    import soundfile as sf

    try:
        info = sf.info(str(wav))
    except (RuntimeError, sf.LibsndfileError):
        return None
    seconds = info.frames / info.samplerate if info.samplerate else 0.0
    if seconds > max_seconds:
        raise TooLarge(
            f"{wav} is {seconds:.1f} s long; a voice prompt may be at most {max_seconds:.0f} s "
            "(cut a clean 3-10 s sentence out of it)",
            reason="PROMPT_TOO_LONG",
        )
    return seconds


def read_recording(wav: Path, max_seconds: float = MAX_PROMPT_SECONDS) -> bytes:
    """The file's bytes, after the cheap header check of its length."""
    check_duration(wav, max_seconds)
    try:
        return wav.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {wav}: {exc.strerror or exc}", reason="BAD_AUDIO") from None


def prompt_bytes_from_audio(wav: Path, transcript: str, language: str, *, encodec_path: Path | None,
                            max_seconds: float = MAX_PROMPT_SECONDS) -> bytes:
    """EnCodec codes of `wav` + phoneme ids of `transcript` -> a validated .npz file's bytes."""
    data = read_recording(wav, max_seconds)
    encodec_path = encodec_path or default_encodec_path()
    if not encodec_path.is_file():
        raise NotFound(
            f"EnCodec weights not found at {encodec_path}: run `vallexctl models fetch --encodec` "
            "or pass --encodec PATH",
            reason="CODEC_NOT_FOUND",
        )
    from vallexd.storage.prompts import prompt_to_bytes
    from vallexd.voices import maker
    from vallexd.voices.audio import decode_audio

    recording = decode_audio(data, max_seconds=max_seconds)
    models = maker.VoiceModels(encodec_path, None)
    prompt, _text = maker.make_prompt(models, recording, transcript, language, wav.name)
    return prompt_to_bytes(prompt)
