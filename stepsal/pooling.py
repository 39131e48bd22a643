"""Pure tensor functions: pool token x token saliency into step x step maps and normalise them.

With P the one-hot step membership [S, T], block sums are ``P @ I @ P.T`` (one matrix product,
never a loop over step pairs). Normalisations (docs/paper.md section 4):

- ``block``: divide by n_i * n_j (reference; causally masked zeros count).
- ``causal``: divide by the number of causally valid pairs (t >= k) in the block [default].
- ``row``: each query step's row sums to 1 (a distribution over earlier steps).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import OptionError
from .options import NORMS


def pool(scores: Float[Tensor, "*head token token"], members: Float[Tensor, "step token"],
         ) -> Float[Tensor, "*head step step"]:
    """Block sums: sum of scores[t, k] over t in step i and k in step j."""
    return members @ scores @ members.transpose(0, 1)


def block_pair_counts(members: Float[Tensor, "step token"]) -> Float[Tensor, "step_q step_k"]:
    """n_i * n_j: all token pairs of each block."""
    sizes = members.sum(-1)
    return sizes[:, None] * sizes[None, :]


def causal_pair_counts(members: Float[Tensor, "step token"]) -> Float[Tensor, "step_q step_k"]:
    """Number of (t, k) pairs with t in step i, k in step j and t >= k."""
    seen = members.cumsum(-1)  # seen[j, t] = tokens of step j at positions <= t
    return members @ seen.transpose(0, 1)


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(num.dtype).tiny), torch.zeros_like(num))


def normalize(sums: Float[Tensor, "*batch step_q step_k"], members: Float[Tensor, "step token"],
              norm: str) -> Float[Tensor, "*batch step_q step_k"]:
    """Turn block sums into a map with the named normalisation; empty blocks give 0."""
    if norm == "block":
        return _safe_divide(sums, block_pair_counts(members).to(sums))
    if norm == "causal":
        return _safe_divide(sums, causal_pair_counts(members).to(sums))
    if norm == "row":
        return _safe_divide(sums, sums.sum(-1, keepdim=True))
    raise OptionError(f"unknown normalisation {norm!r}: use one of {NORMS}.")


def vertical_scores(maps: Float[Tensor, "*batch step_q step_k"], proximity: int) -> Float[Tensor, "*batch step"]:
    """Per step i: the mean of maps[j, i] over the steps j >= i + proximity (what the later steps draw
    from step i); NaN where there are none. Receiver heads, the saliency importance of a step and the
    suppression importance all read a map this way."""
    n = maps.shape[-1]
    rows = torch.arange(n)[:, None] >= torch.arange(n)[None, :] + proximity  # [j, i]
    total = torch.where(rows, maps.double(), 0.0).sum(-2)
    count = rows.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), float("nan"))
