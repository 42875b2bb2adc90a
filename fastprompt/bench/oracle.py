"""The truth each side of a compared pair is checked against, and the verdict it gives.

Two sides that disagree say nothing about which one is right, and a baseline can be wrong: on transformers 5.24,
PEFT 0.21.2's prefix-tuning `generate()` drifts from PEFT's own forward, and its prompt-tuning `generate()`
re-inserts the virtual tokens at every step. So each side is compared with an oracle that does not depend on
either side's machinery being unbroken:

- generation: greedy tokens from a step-by-step argmax over the UNPATCHED model's full forward, with no
  generation cache (every step re-reads the whole sequence; the PEFT model's forward supplies its prefix itself);
- attention / prompt ops: `fastprompt.reference` in float64 (the materializing formulation the tests use);
- training steps have no oracle here: their two sides are compared with each other (the integration tests check
  the patched model's loss and gradients against PEFT's forward written out).

Verdicts: "equal" (the sides agree, and each agrees with the oracle where there is one), "baseline wrong"
(fastprompt agrees with the oracle, the baseline does not), "fastprompt wrong" (fastprompt disagrees with the
oracle: `fastprompt bench` exits non-zero), "unequal" (the sides disagree and there is no oracle to say which is
right), "error" (the case raised), "different method" (a row that compares the cost of two methods whose outputs
differ by design: not compared).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Oracle", "greedy_no_cache", "verdict", "VERDICTS"]

VERDICTS = {
    "equal": "both sides give the same outputs (and match the oracle, where the pair has one)",
    "baseline wrong": "fastprompt matches the oracle, the baseline does not (the reason is printed below)",
    "fastprompt wrong": "fastprompt does not match the oracle: a fastprompt bug; the command exits 1",
    "unequal": "the sides disagree and the pair has no oracle to say which is right",
    "error": "the case raised an exception (message in bench.md / bench.json)",
    "different method": "the sides run different methods on purpose (OS-Prompt's one-stage query vs the two-pass "
                        "query): outputs differ by design and are not compared; the row compares their cost",
}


@dataclass
class Oracle:
    """truth() -> the outputs both sides should give (same keys as Side.check()); `what` names it; `baseline`
    names the baseline's mechanism for the "baseline wrong" line (e.g. "PEFT generate")."""

    truth: Callable[[], dict]
    what: str
    baseline: str
    tol: float = 0.0


@torch.no_grad()
def greedy_no_cache(forward: Callable[..., torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    new_tokens: int, banned: Sequence[int] = ()) -> torch.Tensor:
    """`new_tokens` greedy steps, each an argmax over `forward(ids, mask)`'s last-position logits computed over the
    whole sequence so far (no generation cache): the definition of greedy decoding, with nothing carried between
    steps that could drift. `banned`: token ids never chosen (the end-of-sequence ids while generate()'s
    min_new_tokens holds them back). Returns `[B, S + new_tokens]` like generate()."""
    ids, mask = input_ids, attention_mask
    banned = list(banned)
    for _ in range(new_tokens):
        logits = forward(ids, mask)[:, -1].clone()
        if banned:
            logits[:, banned] = float("-inf")
        nxt = logits.argmax(dim=-1, keepdim=True).to(ids.dtype)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


def verdict(sides_agree: bool, fastprompt_ok: Optional[bool], baseline_ok: Optional[bool]) -> str:
    """The verdict of a pair from the two sides' agreement and, when there is an oracle, each side's."""
    if fastprompt_ok is None:  # no oracle
        return "equal" if sides_agree else "unequal"
    if not fastprompt_ok:
        return "fastprompt wrong"
    if not baseline_ok:
        return "baseline wrong"
    return "equal" if sides_agree else "unequal"
