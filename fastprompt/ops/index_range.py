"""Run-time range checks of the pool indices (prefix_index of prefix_attention, index of gather/mix_prompts).

An index outside [-1, N) would make a kernel read or write another tensor's memory, so it must be refused on
every call, compiled or not, with the same ValueError. The value check needs the data (one host sync), which
torch.compile cannot trace: the checks therefore run inside the ops' custom-op bodies (which execute on real
tensors inside a compiled graph too), and paths without such a body (the reference backends, traced as plain
torch code) route their index through `checked_index`, a tiny custom op whose output they consume so that no
compiler can drop it.
"""
from __future__ import annotations

import torch
from torch import Tensor

_MESSAGES = {
    "prefix_index": "prefix_attention: `prefix_index` entries must be in [-1, N={n}) (-1 = empty slot), "
                    "got values in [{lo}, {hi}]",
    "index": "index values must lie in [-1, {last}] (pool has {n} entries; -1 = empty slot), got min {lo}, max {hi}",
}


def check_index_values(index: Tensor, size: int, name: str) -> bool:
    """Raise ValueError unless every entry of `index` lies in [-1, size). `name` picks the op's wording.
    Returns whether an empty slot (-1) is present (one aminmax, one host sync, for both answers)."""
    if index.numel() == 0:
        return False
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= size:
        raise ValueError(_MESSAGES[name].format(n=size, last=size - 1, lo=lo, hi=hi))
    return lo < 0


@torch.library.custom_op("fastprompt::checked_index", mutates_args=())
def checked_index(index: Tensor, size: int, name: str) -> Tensor:
    """`index` (a copy: custom ops return no aliases) after check_index_values; use the result."""
    check_index_values(index, size, name)
    return index.clone()


@checked_index.register_fake
def _(index, size, name):
    return torch.empty_like(index)
