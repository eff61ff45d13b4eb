"""Batched AR decoding with iteration-level scheduling: rows join and leave at step boundaries.

An `ArRow` is one piece of text being decoded: its own text, prompt, language rows, top_k,
temperature, torch.Generator and k/v cache.  An `ArBatch` holds the rows decoding now.  Each
`step()`:

1. drops rows whose `should_stop()` is true (error = Cancelled);
2. draws one token per row from the row's logits with the row's own sampling and generator;
3. reads every row's token and finiteness flag to the host in ONE transfer (the loop's only sync);
4. retires rows that drew EOS, reached 16 x S frames, or produced non-finite logits
   (error = NonFiniteLogits); nothing is ever sampled from non-finite logits;
5. feeds the remaining rows' tokens through one batched decoder step (`VallEX.ar_step`).

`add()` prefills a new row (its own pass over text + prompt) so it joins at the next step.
A row's numbers do not depend on its neighbours: attention is per row over its own cache (no
padding), only the weight matmuls are shared, so batched and lone runs agree to matmul rounding
(greedy codes are identical on the reference cases, whose best/second-best logit gap is >= 7e-5).

KV-cache memory per row (float32, whatever the matmul dtype): n_layers x 2 x d_model x 4 bytes per
position; 96 KiB per position for the full-size model (12 layers, d 1024).  The cache starts at
S + 1 + P + 256 positions and doubles as needed, up to S + P + 16 x S: e.g. S = 100, P = 225 uses
~55 MB at the start and at most ~180 MB for a run that never draws EOS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vallexd.constants import EOS, MAX_FRAMES_PER_TOKEN
from vallexd.inference.model import Cancelled, NonFiniteLogits, VallEX, sample_token

#: Cache positions allocated beyond the prefix at first; grown by doubling.
INITIAL_FRAMES = 256


def frame_limit(row: ArRow) -> int:
    """The stop rule's frame limit: 16 x S (S = enrolled + new text tokens).  A module-level hook so
    bench/bench_serving.py can give random weights (which never draw EOS) realistic lengths."""
    return MAX_FRAMES_PER_TOKEN * int(row.x.shape[0])


@dataclass(eq=False)
class ArRow:
    """One piece's AR decoding state.  `frames` (codebook-0 codes) and `error` are the results."""

    x: torch.Tensor  # (S,) text ids, enrolled + new
    langs: torch.Tensor  # (S,) model language rows
    prompt0: torch.Tensor  # (P,) prompt codebook-0 codes
    top_k: int
    temperature: float
    generator: torch.Generator | None
    should_stop: Callable[[], bool] | None = None
    owner: Any = None  # whatever the scheduler needs to find the row's request
    text_len: int = 0  # new (not enrolled) text tokens, for information
    frames: list[int] = field(default_factory=list)
    error: Exception | None = None
    # Decoding state, set by ArBatch.add.
    cache: torch.Tensor | None = None  # (n_layers, 2, H, cap, hd)
    logits: torch.Tensor | None = None  # (1, 1025) for the next draw
    filled: int = 0  # cache positions written
    max_frames: int = 0

    @property
    def prompt_len(self) -> int:
        return int(self.prompt0.shape[0])


class ArBatch:
    def __init__(self, model: VallEX) -> None:
        self.model = model
        self.rows: list[ArRow] = []

    def add(self, row: ArRow) -> None:
        """Prefill `row` (text + BOS + prompt) so it takes part in the next step."""
        s, p = row.x.shape[0], row.prompt_len
        row.max_frames = frame_limit(row)
        # The last generated frame is never fed back: S + 1 + P + max_frames - 1 positions at most.
        rows = s + 1 + p + min(INITIAL_FRAMES, row.max_frames - 1)
        row.cache = self.model.new_cache(rows)
        row.logits = self.model.ar_prefill(row.x, row.langs, row.prompt0, row.cache)
        row.filled = s + 1 + p
        self.rows.append(row)

    def remove(self, row: ArRow) -> None:
        """Take a row out between steps (its request failed elsewhere); frees its cache."""
        if row in self.rows:
            self.rows.remove(row)
            row.cache = row.logits = None

    def _grow(self, row: ArRow) -> None:
        assert row.cache is not None
        cap = row.cache.shape[3]
        if row.filled < cap:
            return
        limit = row.x.shape[0] + 1 + row.prompt_len + row.max_frames - 1
        bigger = self.model.new_cache(min(2 * cap, limit))
        bigger[:, :, :, :cap].copy_(row.cache)
        row.cache = bigger

    @torch.inference_mode()
    def step(self) -> list[ArRow]:
        """One decoding step for every row; returns the rows that left (finished or failed)."""
        left: list[ArRow] = []
        for row in list(self.rows):
            if row.should_stop is not None and row.should_stop():
                row.error = Cancelled()
                left.append(row)
                self.remove(row)
        if not self.rows:
            return left
        logits = torch.cat([r.logits for r in self.rows])  # (B, 1025) float32
        finite = torch.isfinite(logits).all(dim=-1)  # (B,)
        # Never sample from NaN/inf (multinomial asserts on CUDA): those rows draw from zeros instead,
        # and the flag read below retires them.
        safe = torch.where(finite.unsqueeze(1), logits, torch.zeros_like(logits))
        toks = torch.cat([sample_token(safe[i : i + 1], r.top_k, r.temperature, r.generator)
                          for i, r in enumerate(self.rows)])  # (B,)
        host = torch.stack([toks, finite.long()]).tolist()  # the one host read per step
        keep: list[int] = []
        for i, row in enumerate(self.rows):
            tok, ok = host[0][i], host[1][i]
            if not ok:
                row.error = NonFiniteLogits("AR")
            elif tok != EOS:
                row.frames.append(tok)
                if len(row.frames) < row.max_frames:  # at the limit the next draw would be discarded
                    keep.append(i)
                    continue
            left.append(row)
        for row in left:
            if row in self.rows:
                self.rows.remove(row)
            row.cache = row.logits = None
        if not keep:
            self.rows = []
            return left
        live = self.rows  # the rows kept, in the order of `keep`
        for row in live:
            self._grow(row)
        out = self.model.ar_step(
            toks[keep],
            [r.prompt_len + len(r.frames) for r in live],  # audio position of the new frame
            [r.cache for r in live],
            [r.filled for r in live],
        )  # (B', 1025)
        for i, row in enumerate(live):
            row.logits = out[i : i + 1]
            row.filled += 1
        return left
