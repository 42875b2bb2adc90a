"""Reference (oracle) versions of the prompt selection ops: obviously correct, float64-ready, slow is fine.

`fastprompt.reference` re-exports these. They are written with plain indexing and broadcasting so that autograd
gives the gradients; the real ops (fastprompt.ops.gather_prompts / mix_prompts) are tested against them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["gather_prompts", "mix_prompts"]


def gather_prompts(pool: Tensor, index: Tensor) -> Tensor:
    """Hard selection: out[..., :] = pool[index[...]]; index -1 gives a zero entry.

    pool [N, *E], index [B] or [B, S] integer -> out [B, *E] or [B, S, *E].
    """
    index = index.long()
    valid = index >= 0
    picked = pool[index.clamp_min(0)]
    mask = valid.reshape(*valid.shape, *([1] * (pool.dim() - 1)))
    return torch.where(mask, picked, torch.zeros((), dtype=pool.dtype, device=pool.device))


def mix_prompts(pool: Tensor, weights: Tensor, index: Optional[Tensor] = None) -> Tensor:
    """Soft mixture: out[b] = sum_n weights[b, n] * pool[n]  (index None, weights [B, N]), or
    out[b] = sum_j weights[b, j] * pool[index[b, j]]  (weights and index [B, k]; index -1 = empty slot)."""
    entry_shape = pool.shape[1:]
    if index is None:
        terms = weights.reshape(*weights.shape, *([1] * len(entry_shape))) * pool.unsqueeze(0)
        return terms.sum(dim=1)
    picked = gather_prompts(pool, index)  # [B, k, *E]
    w = torch.where(index >= 0, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
    terms = w.reshape(*w.shape, *([1] * len(entry_shape))) * picked
    return terms.sum(dim=1)
