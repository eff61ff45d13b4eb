"""The VALL-E X model (AR + NAR decoders), nanoGPT style: one readable module.

The module and parameter names reproduce the public checkpoint's state-dict
keys exactly (see ../shared/reference/MODEL.md), so `load_state_dict(strict=True)`
works on the real 1.5 GB file.  Inference only: there is no dropout and no
training path.

Shapes in comments: S = text tokens (enrolled + new), P = prompt frames,
T = generated frames, L = S + 1 + P + T (AR sequence incl. BOS), d = d_model,
H = heads, hd = d / H.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vallexd.constants import BOS, EOS, MAX_FRAMES_PER_TOKEN, MODEL_LANGUAGES, NUM_QUANTIZERS, TEXT_VOCAB
from vallexd.constants import CODEBOOK_SIZE as NUM_CODES

Device = torch.device | str | None


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 1024
    n_heads: int = 16
    n_layers: int = 12
    text_vocab: int = TEXT_VOCAB
    prefix_mode: int = 1

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.d_model % 2:
            raise ValueError(f"d_model must be a positive even number, got {self.d_model}")
        if self.n_heads <= 0 or self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_layers <= 0:
            raise ValueError(f"n_layers must be positive, got {self.n_layers}")
        if self.prefix_mode != 1:
            raise ValueError(f"only prefix_mode 1 is supported, got {self.prefix_mode}")

    @property
    def ffn(self) -> int:
        return 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class TokenEmbedding(nn.Module):
    def __init__(self, num: int, dim: int, device: Device = None) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(num, dim, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(ids)


_PE_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def sinusoid_table(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """pe[p, 2m] = sin(p / 10000^(2m/d)), pe[p, 2m+1] = cos(...): (length, dim)."""
    key = (dim, str(device), dtype)
    cached = _PE_CACHE.get(key)
    if cached is not None and cached.shape[0] >= length:
        return cached[:length]
    n = max(length, 4096)
    position = torch.arange(0, n, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    pe = torch.zeros(n, dim)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    table = pe.to(device=device, dtype=dtype)
    _PE_CACHE[key] = table
    return table[:length]


class SinePositionalEmbedding(nn.Module):
    """x + alpha * pe[start : start + T] (no scaling of x)."""

    def __init__(self, dim: int, device: Device = None) -> None:
        super().__init__()
        self.dim = dim
        self.alpha = nn.Parameter(torch.ones(1, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, T, d), positions 0..T-1
        return x + self.alpha * sinusoid_table(x.shape[1], self.dim, x.device, x.dtype)


class AdaptiveLayerNorm(nn.Module):
    """w * LayerNorm(x) + b with [w, b] = project_layer(stage vector)."""

    def __init__(self, dim: int, device: Device = None) -> None:
        super().__init__()
        self.dim = dim
        self.project_layer = nn.Linear(dim, 2 * dim, device=device)
        self.norm = nn.LayerNorm(dim, eps=1e-5, device=device)

    def forward(self, x: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:  # stage: (1, d)
        weight, bias = torch.split(self.project_layer(stage), self.dim, dim=-1)
        return weight * self.norm(x) + bias


def make_norm(dim: int, adaptive: bool, device: Device) -> nn.Module:
    return AdaptiveLayerNorm(dim, device) if adaptive else nn.LayerNorm(dim, eps=1e-5, device=device)


class SelfAttention(nn.Module):
    """Multi-head attention with one packed q/k/v projection (nn.MultiheadAttention's parameter names)."""

    def __init__(self, cfg: ModelConfig, device: Device = None) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d, device=device))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d, device=device))
        self.out_proj = nn.Linear(d, d, device=device)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(
        self,
        x: torch.Tensor,  # (1, t, d)
        mask: torch.Tensor | None = None,  # (t, t') bool, True = may attend
        cache: torch.Tensor | None = None,  # (2, 1, H, Lmax, hd), preallocated; rows 0..t-1 filled here
    ) -> torch.Tensor:
        b, t, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (1, t, 3d): one fused matmul
        q, k, v = qkv.view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (1, H, t, hd)
        if cache is not None:
            # The prefill writes the prefix's keys/values in place; Decoder.step appends one row a step.
            cache[0, :, :, :t].copy_(k)
            cache[1, :, :, :t].copy_(v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, H, t, hd)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer with ReLU feed-forward; NAR layers use adaptive norms."""

    def __init__(self, cfg: ModelConfig, adaptive: bool, device: Device = None) -> None:
        super().__init__()
        d = cfg.d_model
        self.adaptive = adaptive
        self.self_attn = SelfAttention(cfg, device)
        self.linear1 = nn.Linear(d, cfg.ffn, device=device)
        self.linear2 = nn.Linear(cfg.ffn, d, device=device)
        self.norm1 = make_norm(d, adaptive, device)
        self.norm2 = make_norm(d, adaptive, device)

    def _norm(self, norm: nn.Module, x: torch.Tensor, stage: torch.Tensor | None) -> torch.Tensor:
        return norm(x, stage) if self.adaptive else norm(x)

    def forward(
        self,
        x: torch.Tensor,
        stage: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self._norm(self.norm1, x, stage), mask, cache)
        h = F.relu(self.linear1(self._norm(self.norm2, x, stage)))
        return x + self.linear2(h)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, adaptive: bool, device: Device = None) -> None:
        super().__init__()
        self.adaptive = adaptive
        self.layers = nn.ModuleList(DecoderLayer(cfg, adaptive, device) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg.d_model, adaptive, device)

    def forward(
        self,
        x: torch.Tensor,
        stage: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,  # (n_layers, 2, 1, H, Lmax, hd)
    ) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, stage, mask, None if cache is None else cache[i])
        return self.norm(x, stage) if self.adaptive else self.norm(x)

    def step(self, x: torch.Tensor, cache: torch.Tensor, pos: int) -> torch.Tensor:
        """One new row (1, 1, d) through every layer: the AR decoding hot path.

        The same computation as `forward` (tests compare it with a full recomputation), written
        with plain functional calls: per token this runs 12 layers x ~12 ops, and module-call
        overhead would otherwise be a visible share of a ~50 ms memory-bound step.
        """
        assert not self.adaptive
        d = x.shape[-1]
        shape = (d,)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            heads, hd = attn.n_heads, attn.head_dim
            h = F.layer_norm(x, shape, layer.norm1.weight, layer.norm1.bias, 1e-5)
            qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(3, heads, hd)
            c = cache[i]  # (2, 1, H, Lmax, hd)
            c[:, 0, :, pos].copy_(qkv[1:])  # k and v of the new row, one in-place write
            y = F.scaled_dot_product_attention(
                qkv[0].view(1, heads, 1, hd), c[0, :, :, : pos + 1], c[1, :, :, : pos + 1]
            )  # one query row sees every cached row: no mask needed
            x = x + F.linear(y.view(1, 1, d), attn.out_proj.weight, attn.out_proj.bias)
            h = F.layer_norm(x, shape, layer.norm2.weight, layer.norm2.bias, 1e-5)
            h = F.relu(F.linear(h, layer.linear1.weight, layer.linear1.bias))
            x = x + F.linear(h, layer.linear2.weight, layer.linear2.bias)
        return F.layer_norm(x, shape, self.norm.weight, self.norm.bias, 1e-5)


def sample_token(
    logits: torch.Tensor, top_k: int, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One draw from (1, V) logits -> (1,) token id, on the logits' device (no host sync here)."""
    if top_k == 1:
        return logits.argmax(dim=-1)  # k = 1 is greedy by definition; no RNG draw
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


class Cancelled(Exception):
    """`should_stop` returned True: the caller abandoned this generation (the engine maps it)."""


def _poll(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled


def prefill_mask(s: int, a: int, device: torch.device) -> torch.Tensor:
    """(s+a, s+a) bool: text rows see all text, no audio; audio rows see all text + audio up to themselves."""
    n = s + a
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:, :s] = True
    mask[s:, s:] = torch.ones(a, a, dtype=torch.bool, device=device).tril()
    return mask


class VallEX(nn.Module):
    def __init__(self, cfg: ModelConfig, device: Device = None) -> None:
        """`device="meta"` builds the structure without allocating or initialising weights (for loading)."""
        super().__init__()
        self.cfg = cfg
        d, dev = cfg.d_model, device
        self.ar_text_embedding = TokenEmbedding(cfg.text_vocab, d, dev)
        self.nar_text_embedding = TokenEmbedding(cfg.text_vocab, d, dev)
        self.ar_audio_embedding = TokenEmbedding(NUM_CODES + 2, d, dev)  # codes + EOS + BOS
        self.ar_language_embedding = TokenEmbedding(len(MODEL_LANGUAGES), d, dev)
        self.nar_language_embedding = TokenEmbedding(len(MODEL_LANGUAGES), d, dev)
        self.ar_text_position = SinePositionalEmbedding(d, dev)
        self.ar_audio_position = SinePositionalEmbedding(d, dev)
        self.nar_text_position = SinePositionalEmbedding(d, dev)
        self.nar_audio_position = SinePositionalEmbedding(d, dev)
        self.ar_decoder = Decoder(cfg, adaptive=False, device=dev)
        self.ar_predict_layer = nn.Linear(d, NUM_CODES + 1, bias=False, device=dev)
        self.nar_audio_embeddings = nn.ModuleList(
            [TokenEmbedding(NUM_CODES + 1, d, dev)]
            + [TokenEmbedding(NUM_CODES, d, dev) for _ in range(NUM_QUANTIZERS - 1)]
        )
        self.nar_decoder = Decoder(cfg, adaptive=True, device=dev)
        self.nar_predict_layers = nn.ModuleList(
            nn.Linear(d, NUM_CODES, bias=False, device=dev) for _ in range(NUM_QUANTIZERS - 1)
        )
        self.nar_stage_embeddings = nn.ModuleList(
            TokenEmbedding(1, d, dev) for _ in range(NUM_QUANTIZERS - 1)
        )
        self.tie_weights()
        self.eval()

    # nar_predict_layers.k shares its weight with nar_audio_embeddings.(k+2) for k = 0..5.
    TIED = tuple(
        (f"nar_predict_layers.{k}.weight", f"nar_audio_embeddings.{k + 2}.word_embeddings.weight")
        for k in range(NUM_QUANTIZERS - 2)
    )

    def tie_weights(self) -> None:
        for k in range(NUM_QUANTIZERS - 2):
            self.nar_predict_layers[k].weight = self.nar_audio_embeddings[k + 2].word_embeddings.weight

    def _text(
        self,
        emb: TokenEmbedding,
        lang_emb: TokenEmbedding,
        pos: SinePositionalEmbedding,
        x: torch.Tensor,
        langs: torch.Tensor,
    ) -> torch.Tensor:
        return pos((emb(x) + lang_emb(langs)).unsqueeze(0))  # (1, S, d)

    @torch.inference_mode()
    def generate_ar(
        self,
        x: torch.Tensor,  # (S,) text ids (enrolled + new)
        langs: torch.Tensor,  # (S,) model language row per text token
        prompt0: torch.Tensor,  # (P,) prompt codebook-0 codes
        top_k: int,
        temperature: float,
        generator: torch.Generator | None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """AR stage: codebook-0 frames after the prompt, (T,) int64, with a preallocated k/v cache."""
        s, p = x.shape[0], prompt0.shape[0]
        max_frames = MAX_FRAMES_PER_TOKEN * s
        dev, cfg = x.device, self.cfg
        dtype = self.ar_predict_layer.weight.dtype
        xe = self._text(self.ar_text_embedding, self.ar_language_embedding, self.ar_text_position, x, langs)
        y0 = torch.cat([torch.full((1,), BOS, dtype=torch.long, device=dev), prompt0])  # (1+P,)
        ye = self.ar_audio_position(self.ar_audio_embedding(y0).unsqueeze(0))  # (1, 1+P, d)
        # Room for the whole run; the last generated frame is never fed back, so S+1+P+max_frames-1 rows.
        length = s + 1 + p + max_frames - 1
        cache = torch.empty(cfg.n_layers, 2, 1, cfg.n_heads, length, cfg.head_dim, dtype=dtype, device=dev)
        h = self.ar_decoder(torch.cat([xe, ye], dim=1), mask=prefill_mask(s, 1 + p, dev), cache=cache)
        logits = self.ar_predict_layer(h[:, -1])  # (1, 1025): last row only
        filled = s + 1 + p
        out = torch.empty(max_frames, dtype=torch.long, device=dev)
        alpha = self.ar_audio_position.alpha
        pe = sinusoid_table(1 + p + max_frames, cfg.d_model, dev, dtype)
        n = 0
        while n < max_frames:
            _poll(should_stop)
            tok = sample_token(logits, top_k, temperature, generator)  # (1,)
            if int(tok) == EOS:  # the one host read per step
                break
            out[n] = tok[0]
            n += 1
            if n == max_frames:
                break  # the stop rule would discard the next draw anyway
            e = self.ar_audio_embedding(tok).unsqueeze(0) + alpha * pe[p + n]  # (1, 1, d): audio pos P+n
            h = self.ar_decoder.step(e, cache, filled)
            filled += 1
            logits = self.ar_predict_layer(h[:, -1])
        return out[:n]

    @torch.inference_mode()
    def generate_nar(
        self,
        x: torch.Tensor,  # (S,)
        langs: torch.Tensor,  # (S,)
        prompt: torch.Tensor,  # (P, 8)
        codes0: torch.Tensor,  # (T,) from the AR stage
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """NAR stages 1..7 (prefix mode 1): (T, 8) int64 codes for the generated frames.

        `should_stop` is polled before each stage, so a cancel lands within one stage (~1/7 of NAR).
        """
        s, p = x.shape[0], prompt.shape[0]
        xt = self._text(
            self.nar_text_embedding, self.nar_language_embedding, self.nar_text_position, x, langs
        )
        ye = self.nar_audio_embeddings[0](torch.cat([prompt[:, 0], codes0])).unsqueeze(0)  # (1, P+T, d)
        for j in range(1, NUM_QUANTIZERS):
            ye[:, :p] += self.nar_audio_embeddings[j](prompt[:, j])
        codes = [codes0]
        for stage in range(1, NUM_QUANTIZERS):
            _poll(should_stop)
            stage_vec = self.nar_stage_embeddings[stage - 1].word_embeddings.weight  # (1, d)
            h = self.nar_decoder(torch.cat([xt, self.nar_audio_position(ye)], dim=1), stage=stage_vec)
            logits = self.nar_predict_layers[stage - 1](h[0, s + p :])  # (T, 1024): generated frames only
            c = logits.argmax(dim=-1)
            codes.append(c)
            if stage < NUM_QUANTIZERS - 1:
                ye[0, p:] += self.nar_audio_embeddings[stage](c)
        return torch.stack(codes, dim=-1)  # (T, 8)

    def generate(
        self,
        x: torch.Tensor,
        langs: torch.Tensor,
        prompt: torch.Tensor,  # (P, 8), P may be 0
        *,
        top_k: int = 0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        codes0 = self.generate_ar(x, langs, prompt[:, 0], top_k, temperature, generator, should_stop)
        if codes0.shape[0] == 0:
            return torch.zeros(0, NUM_QUANTIZERS, dtype=torch.long, device=x.device)
        return self.generate_nar(x, langs, prompt, codes0, should_stop)


def language_ids(
    enroll_len: int, prompt_language: str, text_language: str | Sequence[str], n_text: int
) -> list[int]:
    """Model language row per text token: the prompt language for the enrolled part, then the text's."""
    if isinstance(text_language, str):
        text = [MODEL_LANGUAGES[text_language]] * n_text
    else:
        text = [MODEL_LANGUAGES[lang] for lang in text_language]
    return [MODEL_LANGUAGES[prompt_language]] * enroll_len + text
