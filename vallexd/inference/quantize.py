"""int8 weight matmuls on CPUs with VNNI (`--quantize nar|all`): fbgemm's dynamic quantized linear.

What is quantized: the decoder layers' four weight matmuls (packed q/k/v projection, attention
output projection, both feed-forward layers): ~12 d^2 multiply-adds per position, nearly all of
a layer's work outside attention.  Weights are int8 per output channel (symmetric, scale =
max |w| / 127); activations are quantized on the fly to uint8 with one scale and zero point per
call, accumulated in int32 by fbgemm's VNNI kernels (`vpdpbusd`, 4 multiply-adds per 32-bit lane
against bfloat16's 2), and the result comes back in float32 with the bias added.  Norms,
attention (softmax(qk)v), embeddings, the adaptive-norm projections, the predict layers and the
residual stream stay as they were (float32, or bfloat16 matmuls under --dtype bfloat16).

Batch invariance: the activation scale is taken over ONE row of the batch at a time (the AR step
quantizes each row's (1, d) input on its own; the prefill and the NAR run one request per call),
so a row's numbers never depend on who shares its batch, and since the int32 accumulation is
exact, batched and lone runs give bit-identical results.

Modes: "nar" quantizes the NAR decoder only (per request, compute-bound: a 700 x 1024 x 4096 matmul
took 0.60x the bfloat16 time in one run of bench/bench_int8.py on a 2-core AMD EPYC with AVX-512
BF16 and VNNI, no AMX); "all" also the AR decoder (memory-bound at small batches: a
quarter of float32's weight bytes).  The state dict is unchanged: the float weights stay (the
int8 copy is an attribute of the weight), so the checkpoint's keys and the model's math up to
rounding are those of the published model.  See bench/bench_int8.py for the measurements.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vallexd.constants import QUANTIZE_MODES
from vallexd.errors import InvalidArgument
from vallexd.inference.devices import cpu_flags

__all__ = ["QUANTIZE_MODES", "Int8Linear", "check_int8", "cpu_has_vnni", "quantize_mode", "quantize_model",
           "quantized"]
#: /proc/cpuinfo flags of int8 dot-product instructions.  Without them fbgemm falls back to
#: vpmaddubsw, whose int16 intermediate saturates on full-range uint8 x int8 inputs.
CPU_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
ENGINE = "fbgemm"
#: The attribute of a quantized weight Parameter that holds its Int8Linear.
ATTR = "vallex_int8"


def cpu_has_vnni(cpuinfo: str | Path | None = None) -> bool:
    """True when the CPU has int8 dot products (AVX512_VNNI, AVX_VNNI or AMX-INT8)."""
    return any(flag in cpu_flags(cpuinfo) for flag in CPU_VNNI_FLAGS)


def check_int8(mode: str, device: torch.device, cpuinfo: str | Path | None = None) -> None:
    """Refuse a mode this machine cannot run fast and correctly (`cpuinfo`: for tests).

    Raises InvalidArgument(BAD_QUANTIZE): unknown mode; not the CPU; no VNNI flag; no fbgemm.
    """
    if mode not in QUANTIZE_MODES:
        raise InvalidArgument(f"unknown quantize mode {mode!r}; use one of {', '.join(QUANTIZE_MODES)}",
                              reason="BAD_QUANTIZE")
    if mode == "none":
        return
    if device.type != "cpu":
        raise InvalidArgument(f"--quantize {mode} runs on the CPU only (fbgemm int8 kernels), not on "
                              f"{device.type}: use --quantize none", reason="BAD_QUANTIZE")
    if not cpu_has_vnni(cpuinfo):
        raise InvalidArgument(
            f"--quantize {mode} needs int8 dot-product instructions ({' or '.join(CPU_VNNI_FLAGS)} in "
            f"/proc/cpuinfo); this CPU has none: use --quantize none", reason="BAD_QUANTIZE")
    if ENGINE not in torch.backends.quantized.supported_engines:
        raise InvalidArgument(f"this torch build ({torch.__version__}) has no {ENGINE} int8 kernels: use "
                              f"--quantize none", reason="BAD_QUANTIZE")


class Int8Linear:
    """x (..., K) float -> (..., N) float32 = x @ W^T + b with int8 W (per output channel) and
    uint8 x (one scale per leading index of x: per batch row, see the module doc)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        zeros = torch.zeros(w.shape[0], dtype=torch.long)
        qweight = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
        self.out_features = int(w.shape[0])
        self.packed = torch.ops.quantized.linear_prepack(
            qweight, None if bias is None else bias.detach().float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        k = x.shape[-1]
        # reduce_range=False: full 8-bit activations, exact on VNNI (check_int8 guarantees it).
        parts = [torch.ops.quantized.linear_dynamic(row.reshape(-1, k), self.packed, False) for row in x]
        return torch.cat(parts).view(*x.shape[:-1], self.out_features)


def quantized(weight: torch.Tensor) -> Int8Linear | None:
    """The int8 version of a weight Parameter, if `quantize_model` made one."""
    return weight.__dict__.get(ATTR)


def _layer_weights(decoder: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter | None]]:
    out = []
    for layer in decoder.layers:
        attn = layer.self_attn
        out += [(attn.in_proj_weight, attn.in_proj_bias), (attn.out_proj.weight, attn.out_proj.bias),
                (layer.linear1.weight, layer.linear1.bias), (layer.linear2.weight, layer.linear2.bias)]
    return out


def quantize_model(model: nn.Module, mode: str) -> None:
    """Attach int8 weights to the NAR decoder ("nar") or both decoders ("all"); "none" does nothing.

    Call after the model is placed and its dtype set (a dtype change makes new Parameters, which
    drops the int8 copies).  Call `check_int8` first."""
    if mode == "none":
        return
    torch.backends.quantized.engine = ENGINE  # process-wide; fbgemm is the x86 engine anyway
    decoders = [model.nar_decoder] + ([model.ar_decoder] if mode == "all" else [])
    for decoder in decoders:
        for weight, bias in _layer_weights(decoder):
            weight.__dict__[ATTR] = Int8Linear(weight, bias)


def quantize_mode(model: nn.Module) -> str:
    """Which mode `model` runs in: "none", "nar" or "all"."""
    ar = quantized(model.ar_decoder.layers[0].linear1.weight) is not None
    nar = quantized(model.nar_decoder.layers[0].linear1.weight) is not None
    return "all" if ar else "nar" if nar else "none"
