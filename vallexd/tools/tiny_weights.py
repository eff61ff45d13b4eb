"""Developer tools: tiny random weights in the real file formats.

    python -m vallexd.tools.tiny_weights make-tiny DIR [--d-model 64 --heads 4 --layers 2 --seed 0]

writes, all random and in seconds:

- DIR/vallex-checkpoint.pt            `{"model": state_dict, "config": {...}}`, tied tensors stored twice
- DIR/vocos-encodec-24khz/config.yaml the published class_path/init_args layout, tiny backbone
- DIR/vocos-encodec-24khz/pytorch_model.bin  Vocos state dict without `feature_extractor.encodec.*`
- DIR/encodec_24khz-d7cc33bc.th       an EncodecModel 24 kHz state dict
- DIR/whisper/medium.pt               with --whisper (or make_tiny_whisper): a tiny Whisper in
                                      openai-whisper's format that always hears "Hello" in English

Vocos's codebooks are those of the written EnCodec model, as in the real pair.
The tiny model is the accepted stand-in for the 1.5 GB checkpoint in tests and `--demo`.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from encodec import EncodecModel

from vallexd.constants import WHISPER_DEFAULT_SIZE, WHISPER_DIR
from vallexd.inference.encodec import build_encodec_24khz
from vallexd.inference.model import ModelConfig, VallEX
from vallexd.storage import fsutil

CHECKPOINT_NAME = "vallex-checkpoint.pt"
VOCOS_DIR_NAME = "vocos-encodec-24khz"
ENCODEC_NAME = "encodec_24khz-d7cc33bc.th"


@dataclass(frozen=True)
class TinyPaths:
    root: Path
    checkpoint: Path
    vocos_dir: Path
    encodec: Path


def vocos_config(dim: int = 384, intermediate_dim: int = 1152, num_layers: int = 8) -> dict[str, Any]:
    """The published Vocos encodec-24khz config; the default sizes are the real ones."""
    return {
        "feature_extractor": {
            "class_path": "vocos.feature_extractors.EncodecFeatures",
            "init_args": {
                "encodec_model": "encodec_24khz",
                "bandwidths": [1.5, 3.0, 6.0, 12.0],
                "train_codebooks": False,
            },
        },
        "backbone": {
            "class_path": "vocos.models.VocosBackbone",
            "init_args": {
                "input_channels": 128,
                "dim": dim,
                "intermediate_dim": intermediate_dim,
                "num_layers": num_layers,
                "adanorm_num_embeddings": 4,
            },
        },
        "head": {
            "class_path": "vocos.heads.ISTFTHead",
            "init_args": {"dim": dim, "n_fft": 1280, "hop_length": 320, "padding": "same"},
        },
    }


def _torch_save_atomic(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    fsutil.atomic_write(path, buf.getvalue())


def random_encodec() -> EncodecModel:
    """EnCodec 24 kHz with random weights and random (initialised) codebooks."""
    model = build_encodec_24khz()
    for layer in model.quantizer.vq.layers:
        cb = layer._codebook
        cb.embed.normal_()  # k-means init would leave them at zero: every code would be 0
        cb.embed_avg.copy_(cb.embed)
        cb.inited.fill_(1.0)
    return model.eval()


def random_vocos_state(encodec: EncodecModel, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A Vocos state dict for `config` whose codebooks come from `encodec` (as the real weights do)."""
    from vallexd.inference.vocoder import build_vocos  # vocoder imports vocos; keep devtools' import light

    vocos = build_vocos(config)
    fe = vocos.feature_extractor
    fe.encodec = encodec
    with torch.no_grad():
        fe.codebook_weights.copy_(torch.cat([vq.codebook for vq in encodec.quantizer.vq.layers[: fe.num_q]]))
    return {
        k: v.clone() for k, v in vocos.state_dict().items() if not k.startswith("feature_extractor.encodec.")
    }


def make_tiny(
    directory: Path,
    *,
    d_model: int = 64,
    heads: int = 4,
    layers: int = 2,
    seed: int = 0,
    vocos_dim: int = 64,
    vocos_layers: int = 1,
) -> TinyPaths:
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    vocos_dir = root / VOCOS_DIR_NAME
    vocos_dir.mkdir(exist_ok=True)
    paths = TinyPaths(root, root / CHECKPOINT_NAME, vocos_dir, root / ENCODEC_NAME)
    cfg = ModelConfig(d_model=d_model, n_heads=heads, n_layers=layers)
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's global RNG
        torch.manual_seed(seed)
        model = VallEX(cfg)
        encodec = random_encodec()
        config = vocos_config(dim=vocos_dim, intermediate_dim=3 * vocos_dim, num_layers=vocos_layers)
        vocos_state = random_vocos_state(encodec, config)
    # clone(): the real file stores tied tensors twice, not as one shared storage.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"d_model": d_model, "nhead": heads, "num_layers": layers, "prefix_mode": 1}
    _torch_save_atomic({"model": state, "config": meta}, paths.checkpoint)
    _torch_save_atomic(encodec.state_dict(), paths.encodec)
    _torch_save_atomic(vocos_state, vocos_dir / "pytorch_model.bin")
    fsutil.atomic_write(vocos_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    return paths


#: openai-whisper's published model sizes (state, heads, layers of both stacks), for benchmarks
#: that need the real cost of a size with random weights; "tiny-random" is the test model.
WHISPER_DIMS = {"tiny-random": (32, 2, 1), "tiny": (384, 6, 4), "base": (512, 8, 6), "small": (768, 12, 12),
                "medium": (1024, 16, 24)}


def make_tiny_whisper(path: Path, *, language: str = "en", text: str = " Hello", seed: int = 0,
                      size: str = "tiny-random") -> Path:
    """A tiny Whisper checkpoint in openai-whisper's own file format (`{"dims", "model_state_dict"}`).

    Random weights, except that the decoder is wired to detect `language` and say `text` whatever
    it hears: its blocks add nothing to the residual stream (zeroed output projections), so at
    position p the logits are ln(token + position embedding) @ token embeddings, and each planned
    token's embedding is given the direction of the position that must emit it.  Tests then get a
    deterministic transcript and language from a real Whisper forward pass (needs the asr extra).
    """
    from dataclasses import asdict

    from whisper.model import ModelDimensions, Whisper
    from whisper.tokenizer import get_tokenizer

    state_size, heads, layers = WHISPER_DIMS[size]
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=state_size, n_audio_head=heads,
                           n_audio_layer=layers, n_vocab=51865, n_text_ctx=448, n_text_state=state_size,
                           n_text_head=heads, n_text_layer=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Whisper(dims)
        tok = get_tokenizer(True, num_languages=model.num_languages, language=language, task="transcribe")
        dec = model.decoder
        n = dims.n_text_state
        with torch.no_grad():
            for block in dec.blocks:
                for linear in (block.attn.out, block.cross_attn.out, block.mlp[2]):
                    linear.weight.zero_()
                    linear.bias.zero_()
            emb = dec.token_embedding.weight
            emb.mul_(0.01)
            # Orthonormal directions with zero mean: LayerNorm removes the mean of each vector.
            g = torch.randn(n, n)
            q, _ = torch.linalg.qr(g - g.mean(0, keepdim=True))
            u = q.T - q.T.mean(1, keepdim=True)
            u = u / u.norm(dim=1, keepdim=True)
            dec.positional_embedding.copy_(0.01 * torch.randn_like(dec.positional_embedding))
            # Language detection reads position 0 (after <|startoftranscript|>); the transcript
            # starts after the last token of sot + language + task + notimestamps.
            start = len(tok.sot_sequence_including_notimestamps) - 1
            plan = [(0, tok.to_language_token(language))]
            plan += [(start + i, t) for i, t in enumerate([*tok.encode(text), tok.eot])]
            if start + len(plan) >= n:
                raise ValueError(f"text {text!r} is too long for the tiny Whisper")
            for pos, token in plan:
                dec.positional_embedding[pos] = 10 * u[pos]
                emb[token] += u[pos]
            dec.ln.weight.fill_(100.0)
            dec.ln.bias.zero_()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _torch_save_atomic({"dims": asdict(dims), "model_state_dict": state}, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vallexd.devtools", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write tiny random weights in the real formats")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--d-model", type=int, default=64)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--whisper", action="store_true",
                      help="also write DIR/whisper/medium.pt, a tiny Whisper (needs the asr extra)")
    args = parser.parse_args(argv)
    try:
        paths = make_tiny(
            args.dir, d_model=args.d_model, heads=args.heads, layers=args.layers, seed=args.seed
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(f"checkpoint: {paths.checkpoint}\nvocos:      {paths.vocos_dir}\nencodec:    {paths.encodec}")
    if args.whisper:
        print(f"whisper:    {make_tiny_whisper(paths.root / WHISPER_DIR / f'{WHISPER_DEFAULT_SIZE}.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
