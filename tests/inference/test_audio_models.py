"""Vocos, EnCodec and checkpoint loading with the network unreachable; the tiny pipeline end to end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from vallexd.errors import InvalidArgument, NotFound, TooLarge
from vallexd.inference.encodec import AudioTokenizer, CodecError
from vallexd.inference.engine import Engine
from vallexd.inference.vocoder import Vocoder, VocoderError
from vallexd.storage.prompts import Prompt
from vallexd.types import Sampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NetworkUsed(AssertionError):
    """Raised by the no_network fixture when code under test opens a connection."""


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every outgoing connection fail loudly, and tell Hugging Face Hub it is offline."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise NetworkUsed(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_network_guard_is_effective(no_network: None) -> None:
    with pytest.raises(NetworkUsed):
        urllib.request.urlopen("http://127.0.0.1:9/", timeout=1)


def test_tiny_pipeline_offline(no_network: None, tiny_models: Any) -> None:
    engine = Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu")
    assert (engine.device, engine.dtype, engine.sample_rate) == ("cpu", "float32", 24000)
    assert len(engine.identity) == 64
    prompt = Prompt(np.random.default_rng(0).integers(0, 1024, (1, 10, 8)), np.array([[8, 9, 10]]), "en")
    codes = engine.generate_codes([20, 21, 22, 23], "en", prompt, Sampling(top_k=1))
    assert codes.shape == (16 * 7, 8) and codes.min() >= 0 and codes.max() < 1024
    audio = engine.decode(codes)
    assert audio.dtype == np.float32 and audio.shape == (codes.shape[0] * 320,)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    # No prompt at all: P = 0, enroll_len = 0.
    bare = engine.generate_codes([20, 21], "ja", None, Sampling(top_k=1))
    assert bare.shape == (32, 8)
    assert engine.decode(np.zeros((0, 8), dtype=np.int64)).shape == (0,)
    with pytest.raises(InvalidArgument):
        engine.decode(np.full((3, 8), 1024))


def test_identity_follows_weight_content(tiny_models: Any, tmp_path: Path) -> None:
    a = Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu").identity
    other = tmp_path / "ckpt.pt"
    shutil.copy(tiny_models.checkpoint, other)
    assert Engine.load(other, tiny_models.vocos_dir, device="cpu").identity == a  # same content, other path
    obj = torch.load(tiny_models.checkpoint, weights_only=True)
    obj["model"]["ar_predict_layer.weight"][0, 0] += 1
    torch.save(obj, other)
    assert Engine.load(other, tiny_models.vocos_dir, device="cpu").identity != a


def test_vocos_folder_checks(tiny_models: Any, tmp_path: Path, no_network: None) -> None:
    folder = tmp_path / "vocos"
    shutil.copytree(tiny_models.vocos_dir, folder)
    vocoder = Vocoder.load(folder, torch.device("cpu"))
    assert vocoder.decode(np.zeros((5, 8), dtype=np.int64)).shape == (1600,)

    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["backbone"]["class_path"] = "os.system"  # a config must never name arbitrary code
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(VocoderError, match="class_path"):
        Vocoder.load(folder, torch.device("cpu"))

    shutil.copy(tiny_models.vocos_dir / "config.yaml", folder / "config.yaml")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["backbone.surplus"] = torch.zeros(1)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(VocoderError, match=r"unexpected key 'backbone\.surplus'"):
        Vocoder.load(folder, torch.device("cpu"))

    del state["backbone.surplus"]
    del state["feature_extractor.codebook_weights"]  # only feature_extractor.encodec.* may be missing
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(VocoderError, match=r"missing key 'feature_extractor\.codebook_weights'"):
        Vocoder.load(folder, torch.device("cpu"))

    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(NotFound):
        Vocoder.load(folder, torch.device("cpu"))


@pytest.fixture(scope="module")
def tokenizer(tiny_models: Any) -> AudioTokenizer:
    return AudioTokenizer.load(tiny_models.encodec)


def _tone(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_encodec_tokenizer_offline(no_network: None, tiny_models: Any, tmp_path: Path) -> None:
    tok = AudioTokenizer.load(tiny_models.encodec)  # loaded while the network is unreachable
    codes = tok.encode(_tone(2.0, 24000), 24000)
    assert codes.shape == (1, 150, 8) and codes.dtype == np.int64  # 75 frames a second
    assert codes.min() >= 0 and codes.max() < 1024
    assert len(np.unique(codes)) > 1

    stereo = np.stack([_tone(1.0, 44100), _tone(1.0, 44100, 220.0)], axis=1)  # (frames, 2) at 44.1 kHz
    assert tok.encode(stereo, 44100).shape == (1, 75, 8)

    wav = tmp_path / "tone.wav"
    sf.write(wav, stereo, 44100, subtype="PCM_16")
    from_file = tok.encode_file(wav)
    assert from_file.shape == (1, 75, 8)


def test_encodec_tokenizer_refusals(tokenizer: AudioTokenizer, tmp_path: Path) -> None:
    with pytest.raises(TooLarge) as info:
        tokenizer.encode(np.zeros(16 * 16000, dtype=np.float32), 16000)
    assert info.value.reason == "PROMPT_TOO_LONG"
    with pytest.raises(InvalidArgument) as empty:
        tokenizer.encode(np.zeros(0, dtype=np.float32), 24000)
    assert empty.value.reason == "EMPTY_AUDIO"
    with pytest.raises(InvalidArgument):
        tokenizer.encode(np.full(100, np.nan, dtype=np.float32), 24000)
    with pytest.raises(InvalidArgument):
        tokenizer.encode(np.zeros(100, dtype=np.float32), 0)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF....not audio")
    with pytest.raises(InvalidArgument):
        tokenizer.encode_file(junk)


def test_encodec_weights_checked(tmp_path: Path, tiny_models: Any) -> None:
    state = torch.load(tiny_models.encodec, weights_only=True)
    state.pop(next(iter(state)))
    bad = tmp_path / "encodec_24khz-d7cc33bc.th"
    torch.save(state, bad)
    with pytest.raises(CodecError):
        AudioTokenizer.load(bad)
    with pytest.raises(NotFound):
        AudioTokenizer.load(tmp_path / "absent.th")


def test_make_tiny_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vallexd.tools.tiny_weights",
            "make-tiny",
            str(tmp_path / "t"),
            "--d-model",
            "32",
            "--heads",
            "2",
            "--layers",
            "1",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    obj = torch.load(tmp_path / "t" / "vallex-checkpoint.pt", weights_only=True)
    assert obj["config"] == {"d_model": 32, "nhead": 2, "num_layers": 1, "prefix_mode": 1}
    state = obj["model"]
    # Tied tensors are stored twice (separate storage), as in the published checkpoint.
    a, b = state["nar_predict_layers.0.weight"], state["nar_audio_embeddings.2.word_embeddings.weight"]
    assert torch.equal(a, b) and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    engine = Engine.load(tmp_path / "t" / "vallex-checkpoint.pt", tmp_path / "t" / "vocos-encodec-24khz")
    assert engine.model.cfg.d_model == 32 and engine.model.cfg.n_layers == 1
    assert (
        AudioTokenizer.load(tmp_path / "t" / "encodec_24khz-d7cc33bc.th")
        .encode(_tone(0.5, 16000), 16000)
        .shape[1]
        > 0
    )
