"""`--compile`: torch.compile for the model's dense parts, compiled once at start (before READY).

What is compiled: the AR step's per-layer feed-forward (one graph shared by every layer; dynamic
in the batch size) and the whole NAR decoder (dynamic in the sequence length).  The AR step's
attention stays eager: each row attends over its own cache length, a Python-level loop that
would otherwise recompile for every length.  On CUDA a static k/v cache for CUDA graphs would be
the next step; it is not done here.
"""

from __future__ import annotations

import numpy as np
import torch

from vallexd.errors import InvalidArgument
from vallexd.inference.model import VallEX, feed_forward


def compile_model(model: VallEX) -> None:
    """Swap in compiled versions (lazy: torch compiles on the first call; see `warm_up`).

    Raises InvalidArgument(BAD_QUANTIZE) for an int8 model: the int8 matmuls are fbgemm calls that
    compiled graphs skip (they would silently run in float), and the two were never measured together.
    """
    from vallexd.inference.quantize import quantize_mode

    if quantize_mode(model) != "none":
        raise InvalidArgument("--compile together with --quantize is not supported: use one or the other",
                              reason="BAD_QUANTIZE")
    model.ar_decoder.feed_forward = torch.compile(feed_forward, dynamic=True)
    model.nar_decoder.forward = torch.compile(model.nar_decoder.forward, dynamic=True)


def warm_up(engine: object) -> None:
    """Run one small two-row request so every compiled graph is built now, not on a user's request.

    Batch sizes 1 and >= 2 are separate graphs (torch specialises size 1), so the two pieces have
    different lengths: the batch runs at 2 rows, then at 1.
    """
    from vallexd.storage.prompts import Prompt
    from vallexd.types import Sampling

    prompt = Prompt(np.zeros((1, 2, 8), dtype=np.int64), np.ones((1, 2), dtype=np.int64), "en")
    engine.synthesize([([1, 2, 3], "en"), ([4, 5], "en")], prompt, Sampling(top_k=1, seed=0),  # type: ignore[attr-defined]
                      long_mode="fixed", max_batch=2)
