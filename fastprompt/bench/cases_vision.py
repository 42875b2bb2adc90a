"""Bench cases for prompt-based continual learning on a Vision Transformer (issue 21): DualPrompt and CODA-Prompt at
their published settings on ViT-B/16, against what their reference implementations run.

The model is transformers' ViTForImageClassification with ViTConfig's defaults (ViT-B/16: hidden 768, 12 layers,
12 heads of 64, 224 px, patch 16: 197 tokens), random weights, 100 classes. Settings (the papers'):
- DualPrompt: G-prompt length 5 in layers 0-1, E-prompt pool of 10, length 5, top-1 by key, in layers 2-4;
  training uses the task's E-prompt (task 3 here), inference the key match;
- CODA-Prompt: 100 components (10 tasks x 10), length 8 (4 key / 4 value), layers 0-4; at the last task (all 100
  components in use, the first 90 frozen).
Cases (group "vision CL"), each a fastprompt side and a baseline side on copies of the same model:
- "train step": forward + backward + AdamW on the prompt and the classifier head (the frozen ViT's other weights
  have no gradient), the loss the model's cross-entropy plus the prompt's own (DualPrompt's key pull);
- "inference": one batch under no_grad, logits compared;
- both include the query pass (a frozen forward without prompts, no_grad) as both methods run it;
- "query pass": that frozen forward alone (fastprompt's attention vs the reference's, no prompts);
- "attention layer": one E-prompt layer's attention alone, forward + backward (float64 oracle): where the bytes
  of the steps' difference come from;
- "one-stage": fastprompt's CODA-Prompt step with OS-Prompt's one-stage query (`query_pass="one_stage"`, one
  forward) vs the same step with the two-pass query: a DIFFERENT method, so the outputs are not compared
  (`Case.same_method=False`; tests/test_one_stage_query.py checks it against OS-Prompt's rule).
Baselines (fastprompt/bench/vision_reference.py): "eager concat", the reference implementations' attention
(concatenated prefix K/V, scores materialized, plain softmax) and prompt modules; "SDPA concat", the same with the
concatenated K/V through PyTorch's fused attention.
In `fastprompt bench --full` and the dedicated `fastprompt bench --vision` (about a minute a case on a CPU; the
default run's 140 s budget has no room for them).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from transformers import ViTConfig, ViTForImageClassification

from fastprompt import reference
from fastprompt.integrations import vision
from fastprompt.integrations.attach_state import attach_state
from fastprompt.ops import prefix_attention
from fastprompt.patching import patch_model
from fastprompt.prompts import CodaPrompt, DualPrompt

from .cases import Case, Side, float64_truth, input_grads, train_side
from .oracle import Oracle
from .vision_reference import (EAGER, SDPA, ReferenceCodaPrompt, ReferenceDualPrompt, ReferencePromptedViT,
                               reference_model)

__all__ = ["vision_cases", "vision_case", "vision_attention_case", "vit_config", "VISION_GROUP"]

VISION_GROUP = "vision CL"
BASELINES = {"eager": "eager concat", "sdpa": "SDPA concat", "two_pass": "two-pass query"}
CLASSES = 100


def vit_config(size: str = "vit-b16"):
    """transformers' ViTConfig defaults (ViT-B/16), or a tiny ViT with the same structure for the tests."""
    if size == "vit-b16":
        return ViTConfig(num_labels=CLASSES)
    if size == "tiny":
        return ViTConfig(hidden_size=32, num_hidden_layers=5, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8, num_labels=CLASSES)
    raise ValueError(f"unknown ViT size {size!r}")


def _label(size: str) -> str:
    return "ViT-B/16" if size == "vit-b16" else "ViT tiny"


def _build_prompt(method: str, model, one_stage: bool = False):
    query_pass = "one_stage" if one_stage else "two_pass"
    if method == "dualprompt":
        return DualPrompt(model, g_length=5, g_layers=(0, 1), e_length=5, e_layers=(2, 3, 4), pool_size=10,
                             query_pass=query_pass)
    components = 100 if model.config.hidden_size >= 100 else 20  # the tiny ViT: 20 orthogonal keys in 32 dims
    prompt = CodaPrompt(model, pool_size=components, length=8, layers=(0, 1, 2, 3, 4), num_tasks=10,
                           query_pass=query_pass)
    while prompt.task < prompt.config.num_tasks - 1:  # the last task: all 100 components in use, 90 frozen
        prompt.next_task()
    return prompt


def _reference_prompt(method: str, prompt):
    return ReferenceDualPrompt(prompt) if method == "dualprompt" else ReferenceCodaPrompt(prompt)


def _named_trainable(prompt, classifier):
    return ([(n, p) for n, p in prompt.named_parameters() if p.requires_grad]
            + [(f"classifier.{n}", p) for n, p in classifier.named_parameters()])


def vision_case(kind: str, method: str, baseline: str, size: str = "vit-b16", batch: int = 2, reps: int = 3,
                tags=()) -> Case:
    """kind "train" | "infer" | "qpass" | "one-stage"; method "dualprompt" | "codaprompt"; baseline "eager" |
    "sdpa" | "two_pass" (one-stage only)."""
    if (kind == "one-stage") != (baseline == "two_pass"):
        raise ValueError("the one-stage case is compared with the two-pass query, and only it")

    def build(device):
        config = vit_config(size)
        torch.manual_seed(0)
        base = ViTForImageClassification(config).to(device)
        g = torch.Generator().manual_seed(1)
        pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=g).to(device)
        labels = torch.randint(0, CLASSES, (batch,), generator=g).to(device)
        task_ids = torch.full((batch,), 3, dtype=torch.long, device=device) if method == "dualprompt" else None
        train = kind in ("train", "one-stage")

        def fastprompt_model(one_stage=False):
            model = copy.deepcopy(base)
            prompt = _build_prompt(method, model, one_stage).to(device)
            patch_model(model, prompt)
            model.classifier.requires_grad_(True)
            model.train(train)
            return model, prompt

        def fastprompt_step(model, prompt):
            def forward():
                return model(pixel_values=pixels, labels=labels, task_ids=task_ids).loss
            return train_side(model, forward, lambda: _named_trainable(prompt, model.classifier))

        fp_model, fp_prompt = fastprompt_model(one_stage=kind == "one-stage")
        if kind == "one-stage":
            two_model, two_prompt = fastprompt_model()
            return {"fastprompt": fastprompt_step(fp_model, fp_prompt),
                    "baseline": fastprompt_step(two_model, two_prompt)}

        ref = ReferencePromptedViT(reference_model(base, EAGER if baseline == "eager" else SDPA),
                                   _reference_prompt(method, fp_prompt)).to(device)
        ref.model.classifier.requires_grad_(True)
        ref.train(train)
        keep = [pixels, labels] + list(base.parameters())
        if kind == "train":
            def ref_forward():
                return ref(pixels, labels, task_ids)[1]
            return {"fastprompt": fastprompt_step(fp_model, fp_prompt),
                    "baseline": train_side(ref, ref_forward, lambda: _named_trainable(ref.prompt,
                                                                                        ref.model.classifier))}
        if kind == "infer":
            def fp_infer():
                with torch.no_grad():
                    return {"logits": fp_model(pixel_values=pixels).logits}

            def ref_infer():
                with torch.no_grad():
                    return {"logits": ref(pixels)[0]}
            return {"fastprompt": Side(fp_infer, fp_infer, keep + list(fp_model.parameters())),
                    "baseline": Side(ref_infer, ref_infer, keep + list(ref.parameters()))}
        if kind == "qpass":
            state = attach_state(fp_model)

            def fp_query():
                return {"query": vision.vision_query(fp_model, state, fp_prompt, {"pixel_values": pixels})}

            def ref_query():
                return {"query": ref.query(pixels)}
            return {"fastprompt": Side(fp_query, fp_query, keep + list(fp_model.parameters())),
                    "baseline": Side(ref_query, ref_query, keep + list(ref.parameters()))}
        raise ValueError(f"unknown vision case kind {kind!r}")

    names = {"train": "train step", "infer": "inference", "qpass": "query pass (frozen forward)",
             "one-stage": "train step, one-stage query (OS-Prompt)"}
    title = {"dualprompt": "DualPrompt", "codaprompt": "CODA-Prompt"}[method]
    name = names[kind] if kind == "qpass" else f"{title} {names[kind]}"
    components = 100 if size == "vit-b16" else 20
    settings = {"dualprompt": "G 5 @0-1, E 10x5 top-1 @2-4", "codaprompt": f"{components} comp. x 8 @0-4, task 10/10"}
    params = dict(model=_label(size), B=batch, prompts=settings[method])
    tol = 1e-4 if kind in ("infer", "qpass") else 2e-3
    return Case(VISION_GROUP, name, params, build, BASELINES[baseline], tol, reps, tuple(tags),
                same_method=kind != "one-stage")


def vision_attention_case(size: str = "vit-b16", batch: int = 2, pool: int = 10, length: int = 5,
                          reps: int = 5, tags=()) -> Case:
    """One attention layer, forward + backward, as in DualPrompt's E-prompt layers: each row's prefix an entry of
    a pool [N, H, P, D] picked by index. fastprompt reads the entry in place (prefix_index); the reference
    gathers it per row, concatenates it before the keys and materializes the scores (vision_reference)."""

    def build(device):
        config = vit_config(size)
        heads, dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        seq = (config.image_size // config.patch_size) ** 2 + 1
        g = torch.Generator().manual_seed(0)

        def rnd(*shape, grad=True):
            return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

        q, k, v = rnd(batch, heads, seq, dim), rnd(batch, heads, seq, dim), rnd(batch, heads, seq, dim)
        pool_k, pool_v = rnd(pool, heads, length, dim), rnd(pool, heads, length, dim)
        index = torch.randint(0, pool, (batch,), generator=g).to(device)
        grad_out = rnd(batch, heads, seq, dim, grad=False)
        leaves = (q, k, v, pool_k, pool_v)
        names = ("q", "k", "v", "prefix_k", "prefix_v")

        def reference_way(q, k, v, pool_k, pool_v):  # the reference implementations' Attention.forward
            keys = torch.cat([pool_k[index], k], dim=2)
            values = torch.cat([pool_v[index], v], dim=2)
            attn = (q @ keys.transpose(-2, -1)) * dim ** -0.5
            return attn.softmax(dim=-1) @ values

        def side(attend):
            def step():
                return input_grads(attend(*leaves), leaves, grad_out)

            def check():
                out = attend(*leaves)
                return {"out": out.detach(), **{f"d{n}": d for n, d in zip(names, input_grads(out, leaves, grad_out))}}
            return Side(step, check, list(leaves) + [index, grad_out])

        truth = float64_truth(
            lambda q, k, v, prefix_k, prefix_v: reference.prefix_attention(q, k, v, prefix_k, prefix_v,
                                                                           prefix_index=index, causal=False),
            dict(zip(names, leaves)), names, grad_out)
        return {"fastprompt": side(lambda *a: prefix_attention(*a, prefix_index=index, causal=False)),
                "baseline": side(reference_way),
                "oracle": Oracle(truth, "fastprompt.reference in float64", "the reference attention", 1e-4)}

    heads = vit_config(size).num_attention_heads
    params = dict(model=_label(size), B=batch, prompts=f"pool {pool}x{length}, {heads} heads, per-row entry")
    return Case(VISION_GROUP, "attention layer fwd+bwd (E-prompt layer)", params, build, BASELINES["eager"], 1e-4,
                reps, ("op_level",) + tuple(tags))


def vision_cases(mode: str, gpu: bool = False, size: Optional[str] = None) -> list[Case]:
    """The vision rows of a `fastprompt bench` mode: "full" and "vision" run them at ViT-B/16 (B=2 on the CPU, 32 on
    a GPU), "smoke" at a tiny ViT (the tests); the other modes have none."""
    if mode not in ("full", "vision", "smoke"):
        return []
    size = size or ("tiny" if mode == "smoke" else "vit-b16")
    batch = 32 if gpu and size == "vit-b16" else 2
    reps = 1 if mode == "smoke" else 3
    cases = []
    reference = size == "vit-b16"  # the targets are judged at the published shapes only
    cases.append(vision_attention_case(size, batch, reps=5 if reference else 1))
    for method in ("dualprompt", "codaprompt"):
        for kind in ("train", "infer"):
            for baseline in ("eager", "sdpa"):
                tags = ("vision_reference",) if baseline == "eager" and reference else ()
                cases.append(vision_case(kind, method, baseline, size, batch, reps=reps, tags=tags))
    cases.append(vision_case("qpass", "dualprompt", "eager", size, batch, reps=reps))
    cases.append(vision_case("qpass", "dualprompt", "sdpa", size, batch, reps=reps))
    cases.append(vision_case("one-stage", "codaprompt", "two_pass", size, batch, reps=reps,
                             tags=("vision_one_stage",) if reference else ()))
    return cases
