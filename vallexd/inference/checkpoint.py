"""Load a VALL-E X checkpoint strictly: `{"model": state_dict, "config"?: {...}}`.

Sizes come from the file's "config" dict when present (the tiny test
checkpoints carry one), else they are inferred from tensor shapes:
d_model from the text embedding's width, layers from the count of
`ar_decoder.layers.N` keys.  The number of heads cannot be inferred from
shapes (it only splits d_model), so it comes from the config or defaults to
16, which is the published checkpoint's value.

Any mismatch is a `CheckpointError` naming the file and the first missing,
unexpected or misshapen key.  The file is opened with `weights_only=True`
(no arbitrary unpickling); the model is built on the meta device and adopts
the loaded tensors (`assign=True`), so loading the 1.5 GB checkpoint needs its
size in RAM once, not twice, and never spends time on a random initialisation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vallexd.errors import NotFound
from vallexd.inference.model import ModelConfig, VallEX
from vallexd.inference.weights import WeightsError, load_weights

DEFAULT_CONFIG = ModelConfig()  # 1024 / 16 heads / 12 layers: the published checkpoint
_LAYER_KEY = re.compile(r"^ar_decoder\.layers\.(\d+)\.")
# Accepted spellings of the config keys (the reference code uses nhead/num_layers).
_CONFIG_KEYS = {
    "d_model": ("d_model",),
    "n_heads": ("nhead", "n_heads", "num_heads"),
    "n_layers": ("num_layers", "n_layers"),
    "prefix_mode": ("prefix_mode",),
}


class CheckpointError(WeightsError):
    """A checkpoint file that is not a loadable VALL-E X checkpoint."""

    reason_code = "BAD_CHECKPOINT"


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Return (state_dict, config or None) without building a model; tensors stay on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"checkpoint file {str(path)!r} does not exist", reason="CHECKPOINT_NOT_FOUND")
    # No mmap on purpose: with load_state_dict(assign=True) the loaded tensors *become* the model's
    # parameters, so reading them once into memory costs exactly the model's size (measured peak RSS
    # 2.1 GB for the 1.5 GB file, the same as steady state).  A memory-mapped model would instead
    # depend on the file staying untouched for the daemon's lifetime (rewriting it in place SIGBUSes
    # the process), and copying out of the mapping would double the peak (3.6 GB measured).
    obj = load_weights(path, CheckpointError, "checkpoint")
    if "model" not in obj:
        raise CheckpointError('expected a dict with a "model" state dict', path=path)
    state = obj["model"]
    if not isinstance(state, dict):
        raise CheckpointError('"model" is not a state dict', path=path)
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"entry {key!r} is not a tensor", path=path, key=str(key))
    config = obj.get("config")
    if config is not None and not isinstance(config, dict):
        raise CheckpointError('"config" is not a dict', path=path)
    return state, config


def infer_config(state: dict[str, torch.Tensor], config: dict[str, Any] | None, path: Path) -> ModelConfig:
    """Sizes from `config` when given, else from tensor shapes (heads: default 16)."""
    values: dict[str, int] = {}
    for field, spellings in _CONFIG_KEYS.items():
        for spelling in spellings:
            if config and spelling in config:
                raw = config[spelling]
                if isinstance(raw, bool) or not isinstance(raw, int):
                    raise CheckpointError(f"config {spelling!r} must be an integer, got {raw!r}", path=path)
                values[field] = raw
                break
    emb = state.get("ar_text_embedding.word_embeddings.weight")
    if "d_model" not in values:
        if emb is None or emb.ndim != 2:
            raise CheckpointError(
                "missing key 'ar_text_embedding.word_embeddings.weight'",
                path=path,
                key="ar_text_embedding.word_embeddings.weight",
            )
        values["d_model"] = int(emb.shape[1])
    if "n_layers" not in values:
        layers = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))}
        values["n_layers"] = max(layers) + 1 if layers else DEFAULT_CONFIG.n_layers
    values.setdefault("n_heads", DEFAULT_CONFIG.n_heads)
    try:
        return ModelConfig(**values)
    except ValueError as exc:
        raise CheckpointError(f"bad model sizes {values}: {exc}", path=path) from None


def check_state_dict(model: VallEX, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict comparison against the model's keys and shapes; names the first problem."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [k for k in state if k in expected and tuple(state[k].shape) != expected[k]]
    problems = len(missing) + len(unexpected) + len(misshapen)
    more = f" ({problems - 1} more problem(s))" if problems > 1 else ""
    if missing:
        raise CheckpointError(f"missing key {missing[0]!r}{more}", path=path, key=missing[0])
    if unexpected:
        raise CheckpointError(f"unexpected key {unexpected[0]!r}{more}", path=path, key=unexpected[0])
    if misshapen:
        k = misshapen[0]
        raise CheckpointError(
            f"key {k!r} has shape {tuple(state[k].shape)}, expected {expected[k]}{more}", path=path, key=k
        )
    for k, v in state.items():
        if not v.is_floating_point():
            raise CheckpointError(f"key {k!r} holds {v.dtype}, expected floating point", path=path, key=k)
    # The file stores tied tensors twice; both copies must agree or the tie would silently pick one.
    for a, b in VallEX.TIED:
        if not torch.equal(state[a], state[b]):
            raise CheckpointError(f"tied tensors {a!r} and {b!r} differ", path=path, key=a)


def load_model(path: Path, device: torch.device, dtype: torch.dtype) -> VallEX:
    """Read, check and place the model; parameters are built on the meta device (no random init of 1.5 GB)."""
    path = Path(path)
    state, config = read_checkpoint(path)
    cfg = infer_config(state, config, path)
    model = VallEX(cfg, device="meta")
    check_state_dict(model, state, path)
    # assign=True adopts the loaded tensors instead of copying them into fresh ones.
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign replaced the shared parameters with the file's two copies: re-tie
    # Mixed precision: everything float32, then only the decoders' matmul weights in `dtype`.
    model.to(device=device, dtype=torch.float32)
    if dtype != torch.float32:
        model.set_matmul_dtype(dtype)
    model.tie_weights()  # idempotent; keeps the tie even if a conversion mode made new Parameters
    model.requires_grad_(False)
    return model.eval()
