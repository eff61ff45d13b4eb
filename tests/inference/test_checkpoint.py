"""Strict checkpoint loading: every broken file is refused with the key and the file named."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REFERENCE, require_shared

from vallexd.errors import ErrorCode, InvalidArgument, NotFound, Unavailable
from vallexd.inference.checkpoint import CheckpointError, infer_config, load_model, read_checkpoint
from vallexd.inference.devices import cpu_has_native_bf16, resolve_device, resolve_dtype
from vallexd.inference.model import ModelConfig, VallEX

TINY_CKPT = REFERENCE / "model-tiny" / "checkpoint.pt"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source() -> dict[str, Any]:
    """The reference tiny checkpoint when present, else a freshly built one of the same format."""
    if TINY_CKPT.exists():
        return torch.load(TINY_CKPT, map_location="cpu", weights_only=True)
    model = VallEX(ModelConfig(d_model=64, n_heads=4, n_layers=2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"model": state, "config": {"d_model": 64, "nhead": 4, "num_layers": 2, "prefix_mode": 1}}


def _write(tmp_path: Path, obj: Any, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _copy(source: dict[str, Any]) -> dict[str, Any]:
    return {"model": {k: v.clone() for k, v in source["model"].items()}, "config": dict(source["config"])}


def _load(path: Path) -> VallEX:
    return load_model(path, torch.device("cpu"), torch.float32)


def _expect_error(path: Path, *needles: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        _load(path)
    err = info.value
    assert err.code is ErrorCode.INVALID_ARGUMENT and err.reason == "BAD_CHECKPOINT"
    assert str(path) in err.message
    for needle in needles:
        assert needle in err.message
    return err


def test_good_checkpoint_loads_and_keeps_tie(tmp_path: Path, source: dict[str, Any]) -> None:
    model = _load(_write(tmp_path, _copy(source)))
    assert model.cfg == ModelConfig(d_model=64, n_heads=4, n_layers=2)
    for k in range(6):
        assert model.nar_predict_layers[k].weight is model.nar_audio_embeddings[k + 2].word_embeddings.weight
    assert model.nar_predict_layers[6].weight is not model.nar_audio_embeddings[7].word_embeddings.weight
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_missing_key_is_named(tmp_path: Path, source: dict[str, Any]) -> None:
    obj = _copy(source)
    del obj["model"]["ar_decoder.layers.1.linear2.bias"]
    err = _expect_error(_write(tmp_path, obj), "missing key 'ar_decoder.layers.1.linear2.bias'")
    assert err.details["key"] == "ar_decoder.layers.1.linear2.bias"


def test_unexpected_key_is_named(tmp_path: Path, source: dict[str, Any]) -> None:
    obj = _copy(source)
    obj["model"]["ar_decoder.layers.0.extra.weight"] = torch.zeros(3)
    _expect_error(_write(tmp_path, obj), "unexpected key 'ar_decoder.layers.0.extra.weight'")


def test_wrong_shape_is_named(tmp_path: Path, source: dict[str, Any]) -> None:
    obj = _copy(source)
    obj["model"]["ar_predict_layer.weight"] = torch.zeros(1024, 64)
    _expect_error(_write(tmp_path, obj), "'ar_predict_layer.weight'", "(1024, 64)", "(1025, 64)")


def test_tied_copies_must_agree(tmp_path: Path, source: dict[str, Any]) -> None:
    obj = _copy(source)
    obj["model"]["nar_predict_layers.3.weight"][0, 0] += 1.0
    _expect_error(_write(tmp_path, obj), "nar_predict_layers.3.weight", "differ")


def test_garbage_truncated_and_foreign_files(tmp_path: Path, source: dict[str, Any]) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 40)
    _expect_error(garbage, "not a readable checkpoint")

    good = _write(tmp_path, _copy(source), "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _expect_error(truncated, "not a readable checkpoint")

    # weights_only=True refuses arbitrary pickled objects instead of running them.
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": {}, "hook": Path("/etc/passwd")}))
    _expect_error(evil, "not a readable checkpoint")

    _expect_error(_write(tmp_path, source["model"], "bare.pt"), '"model"')  # a bare state dict
    _expect_error(_write(tmp_path, {"model": {"a": [1, 2]}}, "notensor.pt"), "'a' is not a tensor")

    with pytest.raises(NotFound):
        _load(tmp_path / "absent.pt")


def test_config_inferred_from_shapes(tmp_path: Path, source: dict[str, Any]) -> None:
    obj = _copy(source)
    del obj["config"]
    state, config = read_checkpoint(_write(tmp_path, obj))
    assert config is None
    cfg = infer_config(state, config, tmp_path)
    # d from the embedding width, layers from the key count; heads cannot be inferred: default 16.
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads) == (64, 2, 16)
    model = _load(tmp_path / "ckpt.pt")
    assert model.cfg.n_heads == 16


def test_config_values_are_checked(tmp_path: Path, source: dict[str, Any]) -> None:
    obj = _copy(source)
    obj["config"]["nhead"] = 5  # 64 is not divisible by 5
    _expect_error(_write(tmp_path, obj), "bad model sizes")
    obj["config"]["nhead"] = "4"
    _expect_error(_write(tmp_path, obj), "'nhead' must be an integer")


def test_reference_checkpoint_strict_load() -> None:
    require_shared(TINY_CKPT)
    state = torch.load(TINY_CKPT, map_location="cpu", weights_only=True)["model"]
    model = VallEX(ModelConfig(d_model=64, n_heads=4, n_layers=2))
    model.load_state_dict(state, strict=True)  # the module's names are exactly the file's keys
    assert set(model.state_dict()) == set(state)


def test_devices_and_dtypes() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(InvalidArgument) as info:
        resolve_dtype("float16", cpu)
    assert info.value.reason == "BAD_DTYPE"
    # bfloat16 on the CPU: allowed only where the CPU computes it natively (mixed precision).
    if cpu_has_native_bf16():
        assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    else:
        with pytest.raises(InvalidArgument) as info:
            resolve_dtype("bfloat16", cpu)
        assert info.value.reason == "BAD_DTYPE"
    with pytest.raises(InvalidArgument):
        resolve_dtype("float64", cpu)
    with pytest.raises(InvalidArgument) as dev:
        resolve_device("tpu")
    assert dev.value.reason == "BAD_DEVICE"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(Unavailable) as info:
            resolve_device("cuda")
        assert info.value.reason == "DEVICE_UNAVAILABLE"


def test_engine_load_refuses_unavailable_device(tiny_models: Any) -> None:
    from vallexd.inference.engine import Engine

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(Unavailable):
        Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cuda")
    with pytest.raises(InvalidArgument):
        Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu", dtype="float16")
