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
import math
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _as_int_array(arr: np.ndarray, key: str, name: str) -> np.ndarray:
    """`arr` as int64 when it holds exact integers, whatever its dtype (the reference casts
    float32 tokens that hold whole numbers); refuses objects, text and non-whole values."""
    if arr.dtype.hasobject:
        raise _bad(name, f"{key} is an object array (pickled data is refused)")
    if arr.dtype.kind in "bi":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "u":
        return _checked_unsigned(arr, key, name)
    if arr.dtype.kind == "f":
        if arr.size and not np.isfinite(arr).all():
            raise _bad(name, f"{key} holds NaN or infinity ({arr.dtype}); it must hold whole numbers")
        if arr.size and (np.floor(arr) != arr).any():
            bad = arr[np.floor(arr) != arr].reshape(-1)[0]
            raise _bad(name, f"{key} holds {float(bad)!r}, not a whole number ({arr.dtype})")
        if arr.size and np.abs(arr).max() >= 2.0**62:
            raise _bad(name, f"{key} holds {float(np.abs(arr).max()):g}, far out of range")
        return arr.astype(np.int64)
    raise _bad(name, f"{key} must hold integers, not {arr.dtype}")


def _checked_unsigned(arr: np.ndarray, key: str, name: str) -> np.ndarray:
    if arr.size and int(arr.max()) >= 2**63:
        raise _bad(name, f"{key} holds {int(arr.max())}, far out of range")
    return arr.astype(np.int64)


def _lang_code(value: np.ndarray, name: str) -> int:
    """lang_code as the reference's `int(...)` reads it: 0-d or 1 element, any number or numeric
    string ("2", b"2", 2.0); a non-whole number or non-numeric text is refused."""
    arr = np.asarray(value)
    if arr.dtype.hasobject:
        raise _bad(name, "lang_code is an object array (pickled data is refused)")
    if arr.size != 1:
        raise _bad(name, f"lang_code must be a single integer, got shape {tuple(arr.shape)}")
    item = arr.reshape(-1)[0].item()
    try:
        if isinstance(item, bytes):
            item = item.decode("ascii")
        if isinstance(item, float) and not item.is_integer():
            raise ValueError(item)
        code = int(item)
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
        raise _bad(name, f"lang_code {str(item)[:20]!r} is not an integer") from None
    return code


def validate_arrays(audio: np.ndarray, text: np.ndarray, lang_code: np.ndarray, name: str) -> Prompt:
    """Check the three arrays and build a normalised (int64, C-contiguous) `Prompt`.

    Shapes are checked before any value is looked at; values must be exact integers in range
    whatever the dtype (float tokens holding whole numbers are accepted, as the reference
    casts them). Raises InvalidArgument(BAD_PROMPT) naming the array and the reason.
    """
    if audio.ndim != 3 or audio.shape[0] != 1 or audio.shape[2] != NUM_QUANTIZERS or audio.shape[1] < 1:
        raise _bad(name, f"audio_tokens must have shape (1, P>=1, 8), got {tuple(audio.shape)}")
    if text.ndim != 2 or text.shape[0] != 1:
        raise _bad(name, f"text_tokens must have shape (1, E), got {tuple(text.shape)}")
    if audio.shape[1] > MAX_PROMPT_FRAMES:
        raise _bad(name, f"prompt of {audio.shape[1]} frames is over the limit of {MAX_PROMPT_FRAMES} (30 s)")
    if text.shape[1] > MAX_PROMPT_TEXT:
        raise _bad(name, f"transcript of {text.shape[1]} tokens is over the limit of {MAX_PROMPT_TEXT}")
    code = _lang_code(lang_code, name)
    audio = _as_int_array(audio, "audio_tokens", name)
    text = _as_int_array(text, "text_tokens", name)
    amin, amax = int(audio.min()), int(audio.max())
    if amin < 0 or amax >= CODEBOOK_SIZE:
        bad = amax if amax >= CODEBOOK_SIZE else amin
        raise _bad(name, f"audio_tokens holds code {bad}, outside 0..{CODEBOOK_SIZE - 1}")
    if text.size:
        tmin, tmax = int(text.min()), int(text.max())
        if tmin < 0 or tmax >= TEXT_VOCAB_SIZE:
            bad = tmax if tmax >= TEXT_VOCAB_SIZE else tmin
            raise _bad(name, f"text_tokens holds id {bad}, outside 0..{TEXT_VOCAB_SIZE - 1}")
    if code not in CODE_LANGS:
        raise _bad(name, f"lang_code {code} is not one of 0 (zh), 1 (ja), 2 (en)")
    return Prompt(
        audio_tokens=np.ascontiguousarray(audio, dtype=np.int64),
        text_tokens=np.ascontiguousarray(text, dtype=np.int64),
        language=CODE_LANGS[code],
    )


def _member(zf: zipfile.ZipFile, key: str) -> zipfile.ZipInfo | None:
    """The archive member for array `key`, named with or without `.npy` (numpy reads both)."""
    for candidate in (f"{key}.npy", key):
        try:
            return zf.getinfo(candidate)
        except KeyError:
            continue
    return None


_NPY_MAGIC = b"\x93NUMPY"
_HEADER_FIELD_RES = {
    "descr": re.compile(r"'descr'\s*:\s*'([<>|=]?[A-Za-z]\d{0,4})'"),
    "fortran_order": re.compile(r"'fortran_order'\s*:\s*(True|False)"),
    "shape": re.compile(r"'shape'\s*:\s*\(\s*((?:\d{1,20}\s*,\s*)*\d{0,20})\s*\)"),
}


def _read_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a `.npy` header, parsed with regexes rather than
    numpy's `ast.literal_eval`: a prompt only ever has a plain numeric or string dtype, and
    CPython 3.11's AST state is shared between threads (two threads in `ast` at once can fail
    with "AST constructor recursion depth mismatch", e.g. this upload beside the text warm-up)."""
    magic = f.read(8)
    if len(magic) != 8 or magic[:6] != _NPY_MAGIC or magic[6] not in (1, 2, 3):
        raise ValueError("not a .npy array (bad magic)")
    size_bytes = f.read(2 if magic[6] == 1 else 4)
    size = int.from_bytes(size_bytes, "little")
    if len(size_bytes) not in (2, 4) or size > 10_000:
        raise ValueError("bad .npy header length")
    header = f.read(size).decode("latin1" if magic[6] < 3 else "utf-8")
    fields = {key: regex.search(header) for key, regex in _HEADER_FIELD_RES.items()}
    descr, fortran, dims = fields["descr"], fields["fortran_order"], fields["shape"]
    if descr is None or fortran is None or dims is None or header.count("':") != 3:
        raise ValueError(f"unsupported .npy header {header.strip()[:80]!r} (a plain array is expected)")
    try:
        dtype = np.dtype(descr.group(1))
    except TypeError:
        raise ValueError(f"unknown .npy dtype {descr.group(1)!r}") from None
    shape = tuple(int(d) for d in dims.group(1).replace(" ", "").split(",") if d)
    return shape, fortran.group(1) == "True", dtype


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, name: str) -> np.ndarray:
    """Read one `.npy` member, checking its declared shape and dtype against the limits
    *before* anything is allocated: an 818-byte member may declare (1, 2**40, 8)."""
    if info.file_size > _MAX_ENTRY_BYTES:
        raise _bad(name, f"{key} unpacks to {info.file_size} bytes (limit {_MAX_ENTRY_BYTES})")
    with zf.open(info) as f:
        shape, fortran, dtype = _read_header(f)
        if dtype.hasobject:
            raise _bad(name, f"{key} is an object array (pickled data is refused)")
        if dtype.kind not in "biufSU" or len(shape) > 3:
            raise _bad(name, f"{key} has dtype {dtype} and shape {shape}, not a small numeric array")
        declared = math.prod(shape) * dtype.itemsize
        if declared > _MAX_ENTRY_BYTES:
            raise _bad(name, f"{key} declares shape {shape} of {dtype}: "
                             f"{declared} bytes, over the limit of {_MAX_ENTRY_BYTES}")
        data = f.read(declared)
    if len(data) != declared:
        raise _bad(name, f"{key} holds {len(data)} bytes of data, its header declares {declared}")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def prompt_from_bytes(data: bytes, name: str) -> Prompt:
    """Parse and validate `.npz` bytes; any problem is InvalidArgument(reason="BAD_PROMPT") naming `name`.

    Members may be named with or without `.npy`. Every array's declared shape and dtype are
    checked against the limits before it is read (no allocation from a hostile header).
    """
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise _bad(name, "not an .npz file (not a zip archive)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = {key: _member(zf, key) for key in REQUIRED_KEYS}
            missing = [k for k, info in infos.items() if info is None]
            if missing:
                names = [n[:40] for n in sorted(n.removesuffix(".npy") for n in zf.namelist())[:10]]
                raise _bad(name, f"missing array {missing[0]!r} (has {names})")
            arrays = {k: _read_member(zf, info, k, name) for k, info in infos.items() if info is not None}
    except InvalidArgument:
        raise
    except ValueError as exc:  # numpy refuses object arrays without allow_pickle; bad headers
        msg = str(exc)
        if "pickle" in msg.lower():
            raise _bad(name, "contains a pickled object array (refused)") from None
        raise _bad(name, f"unreadable array: {msg[:200]}") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError, NotImplementedError,
            zlib.error) as exc:
        raise _bad(name, f"damaged .npz file: {str(exc)[:200]}") from None
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
