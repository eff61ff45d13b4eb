"""Request types shared by the service, the worker and the engine (torch-free)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """How the AR stage draws codebook-0 codes (the NAR stages are always greedy).

    top_k: keep the k most likely codes; k <= 0 disables top-k (the reference's default), k = 1 is greedy.
    temperature: logits are divided by it before the softmax; >= constants.MIN_TEMPERATURE.
    seed: seeds the request's own torch.Generator; None draws a fresh seed from `secrets`.
    """

    top_k: int = 0
    temperature: float = 1.0
    seed: int | None = None


#: One piece of text for the model: (phoneme ids, language of the piece or one language per id).
Piece = tuple[Sequence[int], "str | Sequence[str]"]
