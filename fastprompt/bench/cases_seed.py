"""Bench cases for the prompt-pool query pass (issue 14): what the query costs in a training step.

A PromptPool needs a query per input: the frozen model's encoding of it without prompts. Each case times one
training step (forward + backward + AdamW) of a hard top-k prefix pool with a learned linear encoder:
- "fastprompt": the query computed by the patched model itself, either by the default full first pass
  (query_layer=None) or from the hidden state entering layer k (query_layer=k: the query pass runs layers [0, k)
  only, and with the prompts at layers >= k the real pass reuses them);
- "baseline": the same pool and step with the query handed in (`prompt_query=`, computed once outside): the step
  without any query pass. Outputs and gradients are identical, so the ratio is the query pass's cost;
- "no_prefix": the prompt-less step of the same frozen model (forward + backward to the input embeddings), the
  runner's prefix_overhead row.
Registered by one line in runner.suite.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..integrations import query_pass
from ..integrations.attach_state import attach_state
from ..patching import patch_model
from ..prompts import PromptPool
from .cases import Case, no_prefix_side, train_side
from .models import ModelShape, build_base, token_batch

__all__ = ["query_pass_case", "seed_cases"]


def query_pass_case(shape: ModelShape, batch: int, seq: int, query_layer: Optional[int], plen: int = 16,
                    top_k: int = 4, reps: int = 3) -> Case:
    """query_layer None: the full first pass; k: layers [0, k) only, reused by the real pass. The prompts sit in
    layers [first, L) with first = k (or L // 2 for the full pass, so both cases train the same prompts)."""
    first = query_layer if query_layer is not None else shape.layers // 2

    def build(device):
        ids = token_batch(batch, seq, shape.vocab, device)
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        sides, query = {}, None
        for name in ("baseline", "fastprompt"):
            model = build_base(shape, device)
            model.train()
            pool = PromptPool(model.config, pool_size=10, length=max(1, plen // top_k), top_k=top_k,
                              placement="prefix", layers=range(first, shape.layers), encoder="linear",
                              query_layer=query_layer, seed=0).to(device)
            patch_model(model, pool)
            if query is None:
                query = query_pass.compute(model, attach_state(model), pool,
                                           {"input_ids": ids, "attention_mask": mask})[0]
            given = {"prompt_query": query} if name == "baseline" else {}

            def forward(model=model, given=given):
                return model(input_ids=ids, attention_mask=mask, labels=ids, **given).loss

            def named(pool=pool):
                return [(n, p) for n, p in pool.named_parameters() if p.requires_grad]
            sides[name] = train_side(model, forward, named)

        sides["no_prefix"] = no_prefix_side(shape, ids, mask, device)
        return sides

    how = "full first pass" if query_layer is None else f"query_layer={query_layer}, lower layers reused"
    params = dict(model=shape.label(), B=batch, S=seq, P=plen, prompts=f"layers {first}-{shape.layers - 1}")
    return Case("train step", f"pool query pass ({how})", params, build, "query given", 2e-3, reps)


def seed_cases(mode: str) -> list[Case]:
    """The query-pass cases for a `fastprompt bench` mode ("smoke", "quick", "default", "full")."""
    if mode == "smoke":
        tiny = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=128)
        return [query_pass_case(tiny, 2, 16, 1, plen=4, top_k=2, reps=1)]
    shape = ModelShape(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512, vocab=512)
    batch, seq, reps = (4, 128, 2) if mode == "quick" else (4, 256, 3)
    if mode == "full":
        shape = ModelShape(layers=8, hidden=512, heads=8, kv_heads=2, intermediate=1024, vocab=1024)
        batch, seq = 8, 256
    k = shape.layers // 2
    return [query_pass_case(shape, batch, seq, None, reps=reps), query_pass_case(shape, batch, seq, k, reps=reps)]
