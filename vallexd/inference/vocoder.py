"""Vocos (encodec-24khz) from a local folder, with no network access at all.

The published folder holds `config.yaml` (the vocos package's class_path /
init_args form) and `pytorch_model.bin`.  Vocos's own `EncodecFeatures`
builds `EncodecModel.encodec_model_24khz()` with `pretrained=True`, which
downloads EnCodec's weights.  Decoding codes needs none of them: the
codebooks are in Vocos's own state dict (`feature_extractor.codebook_weights`).
So `OfflineEncodecFeatures` builds the same EnCodec architecture with
`pretrained=False`, and the loader accepts exactly the
`feature_extractor.encodec.*` entries as missing — and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from vocos import Vocos
from vocos.feature_extractors import EncodecFeatures, FeatureExtractor
from vocos.pretrained import instantiate_class

from vallexd.constants import SAMPLE_RATE, VOCOS_FILES
from vallexd.errors import NotFound
from vallexd.inference.encodec import build_encodec_24khz
from vallexd.inference.weights import WeightsError, load_weights

BANDWIDTH_ID = 2  # index of 6 kbps in bandwidths [1.5, 3.0, 6.0, 12.0]
FEATURES_CLASS = "vocos.feature_extractors.EncodecFeatures"


class VocoderError(WeightsError):
    reason_code = "BAD_VOCODER"


class OfflineEncodecFeatures(EncodecFeatures):
    """EncodecFeatures whose EnCodec model is built without fetching pretrained weights."""

    def __init__(
        self,
        encodec_model: str = "encodec_24khz",
        bandwidths: list[float] | None = None,
        train_codebooks: bool = False,
    ) -> None:
        FeatureExtractor.__init__(self)  # skip EncodecFeatures.__init__: it downloads
        if encodec_model != "encodec_24khz":
            raise ValueError(f"only encodec_24khz is supported, got {encodec_model!r}")
        self.bandwidths = list(bandwidths) if bandwidths is not None else [1.5, 3.0, 6.0, 12.0]
        self.encodec = build_encodec_24khz()
        self.encodec.requires_grad_(False)
        self.num_q = self.encodec.quantizer.get_num_quantizers_for_bandwidth(
            self.encodec.frame_rate, bandwidth=max(self.bandwidths)
        )
        # Same shape as upstream's concatenated codebooks; the values come from pytorch_model.bin.
        dim = self.encodec.quantizer.dimension
        bins = self.encodec.quantizer.bins
        self.codebook_weights = torch.nn.Parameter(
            torch.zeros(self.num_q * bins, dim), requires_grad=train_codebooks
        )


def read_vocos_config(config_path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        # One line: YAML errors span several (the last one a lone "^" under the column).
        mark = getattr(exc, "problem_mark", None)
        if getattr(exc, "problem", None) and mark is not None:
            problem = f"not valid YAML ({exc.problem} at line {mark.line + 1}, column {mark.column + 1})"
        else:
            problem = " ".join(str(exc).split())[:300]
        raise VocoderError(f"unreadable config: {problem}", path=config_path) from None
    if not isinstance(config, dict):
        raise VocoderError("config is not a mapping", path=config_path)
    # class_path values name code to import: allow only the vocos package's own classes.
    allowed = {
        "feature_extractor": "vocos.feature_extractors.",
        "backbone": "vocos.models.",
        "head": "vocos.heads.",
    }
    for part, prefix in allowed.items():
        section = config.get(part)
        if not isinstance(section, dict) or not isinstance(section.get("class_path"), str):
            raise VocoderError(f"config has no {part}.class_path", path=config_path)
        if not section["class_path"].startswith(prefix):
            raise VocoderError(
                f"{part}.class_path {section['class_path']!r} is not a {prefix}* class", path=config_path
            )
        if not isinstance(section.get("init_args", {}), dict):
            raise VocoderError(f"{part}.init_args is not a mapping", path=config_path)
    if config["feature_extractor"]["class_path"] != FEATURES_CLASS:
        raise VocoderError(f"feature extractor must be {FEATURES_CLASS}", path=config_path)
    return config


def build_vocos(config: dict[str, Any]) -> Vocos:
    """Instantiate Vocos from a parsed config, substituting the offline feature extractor."""
    features = OfflineEncodecFeatures(**config["feature_extractor"].get("init_args", {}))
    backbone = instantiate_class(args=(), init=config["backbone"])
    head = instantiate_class(args=(), init=config["head"])
    return Vocos(feature_extractor=features, backbone=backbone, head=head)


def vocoder_device(device: torch.device) -> torch.device:
    """Where the vocoder runs for a model on `device`: there too, except MPS -> the CPU.

    Vocos's head is an inverse STFT (complex FFT and `fold`), whose MPS support has never been
    verified here; the vocoder is a small share of a request's time, so the CPU costs little.
    """
    return torch.device("cpu") if device.type == "mps" else device


def place_for_decoding(vocos: Vocos, device: torch.device) -> None:
    """Move what decoding codes uses (backbone, head, codebooks) to `device`.

    The feature extractor's EnCodec model (random weights, ~89 MB at the published size) is only
    there for Vocos's audio->features path, which vallexd never calls: it stays on the CPU.
    """
    vocos.backbone.to(device)
    vocos.head.to(device)
    features = vocos.feature_extractor
    features.codebook_weights = torch.nn.Parameter(
        features.codebook_weights.detach().to(device), requires_grad=False
    )


class Vocoder:
    """codes (T, 8) -> 24 kHz mono float32 audio of T x 320 samples."""

    sample_rate = SAMPLE_RATE

    def __init__(self, vocos: Vocos, device: torch.device) -> None:
        self.vocos = vocos
        self.device = device

    @classmethod
    def load(cls, folder: Path, device: torch.device) -> Vocoder:
        folder = Path(folder)
        for name in VOCOS_FILES:
            if not (folder / name).is_file():
                raise NotFound(f"Vocos folder {str(folder)!r} has no {name}", reason="VOCODER_NOT_FOUND")
        config = read_vocos_config(folder / "config.yaml")
        try:
            vocos = build_vocos(config)
        except (TypeError, ValueError, AttributeError, ImportError) as exc:
            raise VocoderError(f"bad class_path/init_args: {exc}", path=folder / "config.yaml") from None
        weights = folder / "pytorch_model.bin"
        state = load_weights(weights, VocoderError)
        try:
            missing, unexpected = vocos.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches raise even when strict=False
            raise VocoderError(
                f"weights do not fit the config: {str(exc).splitlines()[0]}", path=weights
            ) from None
        # The one expected gap: EnCodec's own weights, which decoding never uses.
        missing = [k for k in missing if not k.startswith("feature_extractor.encodec.")]
        if missing:
            raise VocoderError(f"missing key {missing[0]!r}", path=weights)
        if unexpected:
            raise VocoderError(f"unexpected key {unexpected[0]!r}", path=weights)
        vocos.requires_grad_(False)
        place_for_decoding(vocos.eval(), device)
        return cls(vocos, device)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != 8:
            raise ValueError(f"codes must have shape (T, 8), got {codes.shape}")
        if codes.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        t = torch.as_tensor(codes, dtype=torch.long, device=self.device).T.unsqueeze(1)  # (8, 1, T)
        features = self.vocos.codes_to_features(t)  # (1, 128, T)
        bandwidth = torch.tensor([BANDWIDTH_ID], device=self.device)
        audio = self.vocos.decode(features, bandwidth_id=bandwidth)  # (1, T * 320)
        return audio[0].float().cpu().numpy().astype(np.float32, copy=False)
