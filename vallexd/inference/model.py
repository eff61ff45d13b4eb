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

from vallexd.constants import BOS, MODEL_LANGUAGES, NUM_QUANTIZERS, TEXT_VOCAB
from vallexd.constants import CODEBOOK_SIZE as NUM_CODES
from vallexd.inference.quantize import ATTR as INT8_ATTR

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


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """pe[p, 2m] = sin(p / 10000^(2m/d)), pe[p, 2m+1] = cos(...): (length, dim) float32 on the CPU."""
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


class SinePositionalEmbedding(nn.Module):
    """x + alpha * pe[:T] (no scaling of x), added in float32 as the reference does.

    The table is this module's own float32 buffer (not in the state dict), built once at a size that
    covers usual requests and regrown (doubled, outside inference mode) only if a longer one comes.
    """

    INITIAL_ROWS = 2048

    def __init__(self, dim: int, device: Device = None) -> None:
        super().__init__()
        self.dim = dim
        self.alpha = nn.Parameter(torch.ones(1, device=device))
        # Always a real CPU tensor, even when the parameters are built on "meta" for loading.
        self.register_buffer("pe", sinusoid_table(self.INITIAL_ROWS, dim), persistent=False)

    def table(self, length: int) -> torch.Tensor:
        """(>= length, d) float32 rows on the module's device."""
        if self.pe.shape[0] < length:
            with torch.inference_mode(False):  # a normal tensor, whatever mode the caller is in
                rows = max(length, 2 * self.pe.shape[0])
                self.pe = sinusoid_table(rows, self.dim).to(self.alpha.device)
        return self.pe

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, T, d) float32, positions 0..T-1
        return x + self.alpha * self.table(x.shape[1])[: x.shape[1]]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with mixed precision: inputs cast to the weight's dtype, the result back to float32.

    In float32 this is exactly F.linear.  With half weights (`VallEX.set_matmul_dtype`) only the
    matmul runs in half; the residual stream, norms, softmax and predict layers stay float32.  A
    weight with an int8 copy (`--quantize`, quantize.py) runs that instead; its bias is packed with it.
    """
    # torch.compile cannot trace the attribute lookup; --compile is refused with --quantize anyway.
    int8 = None if torch.compiler.is_compiling() else weight.__dict__.get(INT8_ATTR)
    if int8 is not None:
        return int8(x)
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x.to(weight.dtype), weight, bias).float()


class AdaptiveLayerNorm(nn.Module):
    """w * LayerNorm(x) + b with [w, b] = project_layer(stage vector)."""

    def __init__(self, dim: int, device: Device = None) -> None:
        super().__init__()
        self.dim = dim
        self.project_layer = nn.Linear(dim, 2 * dim, device=device)
        self.norm = nn.LayerNorm(dim, eps=1e-5, device=device)

    def forward(self, x: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:  # stage: (1, d)
        proj = self.project_layer
        weight, bias = torch.split(linear(stage, proj.weight, proj.bias), self.dim, dim=-1)
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
        cache: torch.Tensor | None = None,  # (2, H, cap, hd) float32, one row's; rows 0..t-1 filled here
        tail: int = 0,  # > 0: only the last `tail` positions ask (queries); every position is a key
    ) -> torch.Tensor:  # (1, t, d), or (1, tail, d)
        b, t, d = x.shape
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # (1, t, 3d): one fused matmul
        q, k, v = qkv.view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (1, H, t, hd)
        if cache is not None:
            # The prefill writes the prefix's keys/values in place; Decoder.step appends one row a step.
            cache[0, :, :t].copy_(k[0])
            cache[1, :, :t].copy_(v[0])
        if tail:
            q = q[:, :, t - tail :]
            mask = None if mask is None else mask[t - tail :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, H, t or tail, hd)
        return linear(y.transpose(1, 2).reshape(b, q.shape[2], d), self.out_proj.weight, self.out_proj.bias)


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
        tail: int = 0,  # > 0: compute (and return) only the last `tail` positions' outputs
    ) -> torch.Tensor:
        y = self.self_attn(self._norm(self.norm1, x, stage), mask, cache, tail)
        x = (x[:, x.shape[1] - tail :] if tail else x) + y
        h = F.relu(linear(self._norm(self.norm2, x, stage), self.linear1.weight, self.linear1.bias))
        return x + linear(h, self.linear2.weight, self.linear2.bias)


def feed_forward(x: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor, w1: torch.Tensor,
                 b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """x + linear2(relu(linear1(layer_norm(x)))): the AR step's feed-forward half of a layer (x (B, 1, d)).

    A plain function of tensors so that `--compile` can swap in one compiled graph for every layer."""
    h = F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, 1e-5)
    return x + linear(F.relu(linear(h, w1, b1)), w2, b2)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, adaptive: bool, device: Device = None) -> None:
        super().__init__()
        self.adaptive = adaptive
        self.feed_forward = feed_forward  # replaced by a compiled version under --compile
        self.layers = nn.ModuleList(DecoderLayer(cfg, adaptive, device) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg.d_model, adaptive, device)

    def forward(
        self,
        x: torch.Tensor,
        stage: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: torch.Tensor | None = None,  # (n_layers, 2, H, cap, hd): one row's k/v cache
        tail: int = 0,
    ) -> torch.Tensor:
        """(1, t, d) -> (1, t, d); with `tail` > 0 -> (1, tail, d), the last `tail` positions only.

        With `tail` the last layer runs its attention queries, output projection and feed-forward
        for those positions alone (the others' outputs would be discarded).  Each position gets the
        same computation as without `tail`, up to matmul rounding (a float32 GEMM may round the last
        bit differently for another row count; the reference cases' codes stay exact).  The NAR only
        reads the generated frames: with S text tokens, P prompt frames and T new ones this skips
        ~(S + P) / (S + P + T) of one layer in twelve (in bfloat16 the NAR took 0.945x the time at
        L = 530, T = 130, one thread, one run, on a 2-core AMD EPYC with AVX-512 BF16 and VNNI).
        """
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, stage, mask, None if cache is None else cache[i], tail if i == last else 0)
        return self.norm(x, stage) if self.adaptive else self.norm(x)

    def step(self, x: torch.Tensor, caches: Sequence[torch.Tensor], pos: Sequence[int]) -> torch.Tensor:
        """One new position for each of B rows: x (B, 1, d) -> (B, 1, d). The AR decoding hot path.

        Row r writes its k/v at `pos[r]` of its own cache `caches[r]` (n_layers, 2, H, cap, hd) and
        attends to its rows 0..pos[r]: rows of different lengths need no padding and no mask, so a
        row's numbers are those of a lone run up to matmul rounding.  The weight matmuls are shared
        by the whole batch (the point of batching: one pass over the weights per step).  Plain
        functional calls: per token this runs n_layers x ~12 ops, and module-call overhead would
        otherwise be a visible share of a memory-bound step.
        """
        assert not self.adaptive
        b, _, d = x.shape
        shape = (d,)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            heads, hd = attn.n_heads, attn.head_dim
            h = F.layer_norm(x, shape, layer.norm1.weight, layer.norm1.bias, 1e-5)
            qkv = linear(h, attn.in_proj_weight, attn.in_proj_bias).view(b, 3, heads, hd)
            ys = []
            for r in range(b):
                c, p = caches[r][i], pos[r]  # (2, H, cap, hd)
                c[:, :, p].copy_(qkv[r, 1:])  # k and v of the new position, one in-place write
                kv = c[:, None, :, : p + 1]  # (2, 1, H, p+1, hd): 4-D, as the fused CPU kernel wants
                ys.append(F.scaled_dot_product_attention(
                    qkv[r, 0].view(1, heads, 1, hd), kv[0], kv[1]
                ))  # (1, H, 1, hd): one query sees every cached position, no mask needed
            y = torch.cat(ys).view(b, 1, d)
            x = x + linear(y, attn.out_proj.weight, attn.out_proj.bias)
            x = self.feed_forward(x, layer.norm2.weight, layer.norm2.bias, layer.linear1.weight,
                                  layer.linear1.bias, layer.linear2.weight, layer.linear2.bias)
        return F.layer_norm(x, shape, self.norm.weight, self.norm.bias, 1e-5)


def sample_token(
    logits: torch.Tensor, top_k: int, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One draw from (1, V) float32 logits -> (1,) token id, on the logits' device (no host sync here)."""
    if top_k == 1:
        return logits.argmax(dim=-1)  # k = 1 is greedy by definition; no RNG draw
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


class Cancelled(Exception):
    """`should_stop` returned True: the caller abandoned this generation (the engine maps it)."""


class NonFiniteLogits(Exception):
    """A stage produced NaN or infinite logits (overflow, broken weights); the engine maps it to
    Internal(NON_FINITE).  Checked in the AR loop's one host read per step and once per NAR stage,
    so nothing is ever sampled from them (on CUDA, multinomial would trip a sticky device assert)."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"non-finite logits in the {stage} stage")
        self.stage = stage


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

    def set_matmul_dtype(self, dtype: torch.dtype) -> None:
        """Mixed precision: the decoders' matmul weights (q/k/v, out, feed-forward, adaptive-norm
        projections) in `dtype`; embeddings, norms, position tables, both predict layers, the k/v
        cache and the residual stream stay float32.  State-dict keys are unchanged."""
        for dec in (self.ar_decoder, self.nar_decoder):
            for mod in dec.modules():
                if isinstance(mod, (SelfAttention, nn.Linear)):
                    mod.to(dtype)

    def _text(
        self,
        emb: TokenEmbedding,
        lang_emb: TokenEmbedding,
        pos: SinePositionalEmbedding,
        x: torch.Tensor,
        langs: torch.Tensor,
    ) -> torch.Tensor:
        return pos((emb(x) + lang_emb(langs)).unsqueeze(0))  # (1, S, d)

    def new_cache(self, rows: int) -> torch.Tensor:
        """An empty float32 k/v cache for one AR row: (n_layers, 2, H, rows, hd)."""
        cfg = self.cfg
        dev = self.ar_predict_layer.weight.device
        return torch.empty(cfg.n_layers, 2, cfg.n_heads, rows, cfg.head_dim, device=dev)

    @torch.inference_mode()
    def ar_prefill(self, x: torch.Tensor, langs: torch.Tensor, prompt0: torch.Tensor, cache: torch.Tensor
                   ) -> torch.Tensor:
        """Run text (S,) + [BOS; prompt0 (P,)] through the AR decoder, filling cache rows 0..S+P.

        Returns the (1, 1025) float32 logits of the first generated frame.
        """
        s, dev = x.shape[0], x.device
        xe = self._text(self.ar_text_embedding, self.ar_language_embedding, self.ar_text_position, x, langs)
        y0 = torch.cat([torch.full((1,), BOS, dtype=torch.long, device=dev), prompt0])  # (1+P,)
        ye = self.ar_audio_position(self.ar_audio_embedding(y0).unsqueeze(0))  # (1, 1+P, d)
        h = self.ar_decoder(torch.cat([xe, ye], dim=1), mask=prefill_mask(s, y0.shape[0], dev), cache=cache)
        return self.ar_predict_layer(h[:, -1])  # (1, 1025): last row only

    @torch.inference_mode()
    def ar_step(self, tokens: torch.Tensor, audio_pos: Sequence[int], caches: Sequence[torch.Tensor],
                filled: Sequence[int]) -> torch.Tensor:
        """Feed each row's last drawn token (B,) at its audio position; -> (B, 1025) float32 logits.

        Row r's token goes to cache position `filled[r]` (= S + 1 + P + frames so far - 1).
        """
        pe = self.ar_audio_position.table(max(audio_pos) + 1)
        idx = torch.tensor(list(audio_pos), device=pe.device)
        e = self.ar_audio_embedding(tokens) + self.ar_audio_position.alpha * pe[idx]  # (B, d)
        h = self.ar_decoder.step(e.unsqueeze(1), caches, filled)  # (B, 1, d)
        return self.ar_predict_layer(h[:, -1])

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
        """AR stage alone: codebook-0 frames after the prompt, (T,) int64 (a batch of one row).

        Raises Cancelled or NonFiniteLogits.
        """
        from vallexd.inference.batch import ArBatch, ArRow  # the batch module builds on this one

        batch = ArBatch(self)
        row = ArRow(x, langs, prompt0, top_k, temperature, generator, should_stop)
        batch.add(row)
        while batch.rows:
            batch.step()
        if row.error is not None:
            raise row.error
        return torch.tensor(row.frames, dtype=torch.long, device=x.device)

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
        Each stage's logits are checked for NaN/inf (one host read per stage): NonFiniteLogits.
        """
        p, t = prompt.shape[0], codes0.shape[0]
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
            h = self.nar_decoder(torch.cat([xt, self.nar_audio_position(ye)], dim=1), stage=stage_vec,
                                 tail=t)  # (1, T, d): the generated frames only
            logits = self.nar_predict_layers[stage - 1](h[0])  # (T, 1024)
            if not bool(torch.isfinite(logits).all()):
                raise NonFiniteLogits(f"NAR {stage}")
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
