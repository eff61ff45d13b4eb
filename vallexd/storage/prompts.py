"""Voice prompt files (`.npz`): load, validate, save, digest.

Torch-free on purpose: the client imports this module to check a prompt file
before uploading it.  A prompt file holds three arrays (see MODEL.md):

- `audio_tokens`: int (1, P, 8), EnCodec 24 kHz / 6 kbps codes, each 0..1023, P >= 1
- `text_tokens`:  int (1, E), phoneme ids of the prompt's transcript
- `lang_code`:    int scalar, zh=0, ja=1, en=2 (NOT the model's embedding order)

Every array is read with `allow_pickle=False`, so a file can never make us
unpickle objects.  Text ids are accepted in 0..2047 (the model's 2048-row
text embedding) rather than only the 70-entry front-end vocabulary: the
published presets use 5..69, and any id below 2048 is a valid model input.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vallexd.constants import CODEBOOK_SIZE, LANG_CODES, MAX_PROMPT_FRAMES, MAX_PROMPT_TEXT, NUM_QUANTIZERS
from vallexd.constants import TEXT_VOCAB as TEXT_VOCAB_SIZE
from vallexd.errors import InvalidArgument, NotFound
from vallexd.storage import fsutil

CODE_LANGS: dict[int, str] = {v: k for k, v in LANG_CODES.items()}

# Size caps: a small compressed upload must not unpack into gigabytes, and the AR key/value cache grows
# with the prompt.  Presets are made from <= 15 s of audio (1125 frames); the shared ones reach 971
# frames and 191 text tokens.  30 s / 1024 tokens leaves room without letting a prompt eat the model.
_MAX_ENTRY_BYTES = 1 << 20  # uncompressed size of one array in the .npz (2250 x 8 int64 = 144 KB)
REQUIRED_KEYS = ("audio_tokens", "text_tokens", "lang_code")


@dataclass(frozen=True)
class Prompt:
    audio_tokens: np.ndarray  # (1, P, 8) int64, values 0..1023
    text_tokens: np.ndarray  # (1, E) int64, phoneme ids of the prompt transcript
    language: str  # "en" | "zh" | "ja"

    @property
    def num_frames(self) -> int:
        return int(self.audio_tokens.shape[1])


def _bad(name: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"prompt {name!r}: {problem}", reason="BAD_PROMPT", details={"prompt": name})


def _check_int_array(arr: np.ndarray, key: str, name: str) -> None:
    if arr.dtype == object:
        raise _bad(name, f"{key} is an object array (pickled data is refused)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise _bad(name, f"{key} must hold integers, not {arr.dtype}")


def validate_arrays(audio: np.ndarray, text: np.ndarray, lang_code: np.ndarray, name: str) -> Prompt:
    """Check the three arrays and build a normalised (int64, C-contiguous) `Prompt`."""
    _check_int_array(audio, "audio_tokens", name)
    _check_int_array(text, "text_tokens", name)
    _check_int_array(lang_code, "lang_code", name)
    if audio.ndim != 3 or audio.shape[0] != 1 or audio.shape[2] != NUM_QUANTIZERS or audio.shape[1] < 1:
        raise _bad(name, f"audio_tokens must have shape (1, P>=1, 8), got {tuple(audio.shape)}")
    if text.ndim != 2 or text.shape[0] != 1:
        raise _bad(name, f"text_tokens must have shape (1, E), got {tuple(text.shape)}")
    if audio.shape[1] > MAX_PROMPT_FRAMES:
        raise _bad(name, f"prompt of {audio.shape[1]} frames is over the limit of {MAX_PROMPT_FRAMES} (30 s)")
    if text.shape[1] > MAX_PROMPT_TEXT:
        raise _bad(name, f"transcript of {text.shape[1]} tokens is over the limit of {MAX_PROMPT_TEXT}")
    if lang_code.size != 1 or lang_code.ndim > 1:
        raise _bad(name, f"lang_code must be a single integer, got shape {tuple(lang_code.shape)}")
    amin, amax = int(audio.min()), int(audio.max())
    if amin < 0 or amax >= CODEBOOK_SIZE:
        bad = amax if amax >= CODEBOOK_SIZE else amin
        raise _bad(name, f"audio_tokens holds code {bad}, outside 0..{CODEBOOK_SIZE - 1}")
    if text.size:
        tmin, tmax = int(text.min()), int(text.max())
        if tmin < 0 or tmax >= TEXT_VOCAB_SIZE:
            bad = tmax if tmax >= TEXT_VOCAB_SIZE else tmin
            raise _bad(name, f"text_tokens holds id {bad}, outside 0..{TEXT_VOCAB_SIZE - 1}")
    code = int(lang_code.reshape(()))
    if code not in CODE_LANGS:
        raise _bad(name, f"lang_code {code} is not one of 0 (zh), 1 (ja), 2 (en)")
    return Prompt(
        audio_tokens=np.ascontiguousarray(audio, dtype=np.int64),
        text_tokens=np.ascontiguousarray(text, dtype=np.int64),
        language=CODE_LANGS[code],
    )


def prompt_from_bytes(data: bytes, name: str) -> Prompt:
    """Parse and validate `.npz` bytes; any problem is InvalidArgument(reason="BAD_PROMPT") naming `name`."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise _bad(name, "not an .npz file (not a zip archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            missing = [k for k in REQUIRED_KEYS if k not in npz.files]
            if missing:
                raise _bad(name, f"missing array {missing[0]!r} (has {sorted(npz.files)})")
            for key in REQUIRED_KEYS:  # check the declared size before numpy inflates anything
                size = npz.zip.getinfo(f"{key}.npy").file_size
                if size > _MAX_ENTRY_BYTES:
                    raise _bad(name, f"{key} unpacks to {size} bytes (limit {_MAX_ENTRY_BYTES})")
            arrays = {k: npz[k] for k in REQUIRED_KEYS}
    except InvalidArgument:
        raise
    except ValueError as exc:  # numpy refuses object arrays without allow_pickle
        msg = str(exc)
        if "pickle" in msg.lower():
            raise _bad(name, "contains a pickled object array (refused)") from None
        raise _bad(name, f"unreadable array: {msg}") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError) as exc:
        raise _bad(name, f"damaged .npz file: {exc}") from None
    return validate_arrays(arrays["audio_tokens"], arrays["text_tokens"], arrays["lang_code"], name)


def load_prompt(path: Path) -> Prompt:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"prompt file {str(path)!r} does not exist", reason="PROMPT_NOT_FOUND") from None
    except OSError as exc:
        raise _bad(path.name, f"cannot read {str(path)!r}: {exc.strerror}") from None
    return prompt_from_bytes(data, path.name)


def prompt_to_bytes(prompt: Prompt) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        audio_tokens=np.asarray(prompt.audio_tokens, dtype=np.int64),
        text_tokens=np.asarray(prompt.text_tokens, dtype=np.int64),
        lang_code=np.asarray(LANG_CODES[prompt.language], dtype=np.int64),
    )
    return buf.getvalue()


def save_prompt(prompt: Prompt, path: Path) -> None:
    if prompt.language not in LANG_CODES:
        raise _bad(Path(path).name, f"language {prompt.language!r} is not one of en, zh, ja")
    validate_arrays(
        np.asarray(prompt.audio_tokens),
        np.asarray(prompt.text_tokens),
        np.asarray(LANG_CODES[prompt.language]),
        Path(path).name,
    )
    fsutil.atomic_write(Path(path), prompt_to_bytes(prompt), mode=0o644)  # shared, readable data


def prompt_digest(prompt: Prompt) -> str:
    """sha256 of the canonical content: independent of the file's dtype (int32/int64) or zip layout."""
    h = hashlib.sha256(b"vallexd-prompt-v1\0")
    audio = np.ascontiguousarray(prompt.audio_tokens, dtype="<i8")
    text = np.ascontiguousarray(prompt.text_tokens, dtype="<i8")
    h.update(f"{prompt.language}\0{audio.shape}\0{text.shape}\0".encode())
    h.update(audio.tobytes())
    h.update(text.tobytes())
    return h.hexdigest()
