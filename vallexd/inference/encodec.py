"""EnCodec 24 kHz at 6 kbps: audio -> prompt codes (1, T, 8), from a local weights file, no network.

The weights file is EnCodec's own `encodec_24khz-d7cc33bc.th` (an EncodecModel
state dict).  We build the architecture with `pretrained=False` (which never
downloads) and load that file strictly.  Input audio of any sample rate, mono
or stereo, is mixed down and resampled to 24 kHz mono as the reference does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF
from encodec import EncodecModel

from vallexd.constants import MAX_PROMPT_SECONDS, SAMPLE_RATE
from vallexd.errors import InvalidArgument, NotFound, TooLarge
from vallexd.inference.weights import WeightsError, load_weights

BANDWIDTH_KBPS = 6.0  # 8 codebooks
NUM_CODEBOOKS = 8


def build_encodec_24khz() -> EncodecModel:
    """The EnCodec 24 kHz architecture with random weights: `pretrained=False` never downloads."""
    with warnings.catch_warnings():
        # encodec 0.1.1 uses the deprecated torch.nn.utils.weight_norm; its state-dict keys depend on it.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*weight_norm.*")
        return EncodecModel.encodec_model_24khz(pretrained=False)


class CodecError(WeightsError):
    reason_code = "BAD_CODEC"


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Read an audio file with soundfile: (frames,) or (frames, channels) float32, sample rate."""
    import soundfile as sf  # local import: only prompt creation needs it

    if not Path(path).is_file():  # soundfile reports a missing file as a generic LibsndfileError
        raise NotFound(f"audio file {str(path)!r} does not exist", reason="AUDIO_NOT_FOUND")
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise InvalidArgument(
            f"cannot read audio file {Path(path).name!r}: {exc}", reason="BAD_AUDIO"
        ) from None
    return audio, int(sr)


def to_mono_24k(audio: np.ndarray, sample_rate: int) -> torch.Tensor:
    """(frames,) or (frames, channels) at any rate -> (n,) float32 at 24 kHz; refuses empty or > 15 s."""
    arr = np.asarray(audio)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise InvalidArgument(
            f"sample rate must be a positive integer, got {sample_rate!r}", reason="BAD_AUDIO"
        )
    if arr.ndim not in (1, 2) or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise InvalidArgument(
            f"audio must be a (frames,) or (frames, channels) numeric array, got {arr.dtype} {arr.shape}",
            reason="BAD_AUDIO",
        )
    if np.issubdtype(arr.dtype, np.integer):  # PCM integers -> [-1, 1)
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max + 1)
    if arr.ndim == 2:
        arr = arr.mean(axis=1)  # soundfile layout: (frames, channels)
    if arr.size == 0:
        raise InvalidArgument("prompt audio is empty", reason="EMPTY_AUDIO")
    seconds = arr.shape[0] / sample_rate
    if seconds > MAX_PROMPT_SECONDS:
        raise TooLarge(
            f"prompt audio is {seconds:.1f} s long; the limit is {MAX_PROMPT_SECONDS:.0f} s",
            reason="PROMPT_TOO_LONG",
        )
    if not np.isfinite(arr).all():
        raise InvalidArgument("prompt audio contains NaN or infinite samples", reason="BAD_AUDIO")
    wav = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if sample_rate != SAMPLE_RATE:
        wav = AF.resample(wav, int(sample_rate), SAMPLE_RATE)
    if wav.numel() == 0:
        raise InvalidArgument("prompt audio is too short to resample", reason="EMPTY_AUDIO")
    return wav


class AudioTokenizer:
    """EnCodec 24 kHz encoder at 6 kbps."""

    def __init__(self, model: EncodecModel, device: torch.device) -> None:
        self.model = model
        self.device = device

    @classmethod
    def load(cls, weights: Path, device: torch.device | str = "cpu") -> AudioTokenizer:
        weights = Path(weights)
        if not weights.is_file():
            raise NotFound(f"EnCodec weights {str(weights)!r} do not exist", reason="CODEC_NOT_FOUND")
        model = build_encodec_24khz()  # architecture only: no download
        state = load_weights(weights, CodecError)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CodecError(
                f"not EnCodec 24 kHz weights: {str(exc).splitlines()[0]}", path=weights
            ) from None
        model.set_target_bandwidth(BANDWIDTH_KBPS)
        model.requires_grad_(False)
        model.eval().to(device)
        return cls(model, torch.device(device))

    @torch.inference_mode()
    def encode(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Audio -> codes (1, T, 8) int64, 75 frames a second."""
        wav = to_mono_24k(audio, sample_rate).to(self.device)
        frames = self.model.encode(wav.view(1, 1, -1))  # list of (codes (1, 8, T), scale)
        codes = torch.cat([codes for codes, _ in frames], dim=-1)  # (1, 8, T)
        return codes.transpose(1, 2).cpu().numpy().astype(np.int64)

    def encode_file(self, path: Path) -> np.ndarray:
        audio, sr = read_wav(path)
        return self.encode(audio, sr)
