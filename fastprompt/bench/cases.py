"""The compared pairs: for each case, a fastprompt side and a baseline side (the real PEFT + transformers path, or
the explicit formulation PEFT users write), each a `Side` with a step to time and count and a `check` that returns
the outputs/gradients to compare. Cases are built lazily (`Case.build`) so only one case's models live at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import reference
from ..integrations.peft import prefix_layer_kv
from ..integrations.transformers_attention import LayerPrefix, layer_prefixes
from ..ops import gather_prompts, mix_prompts, prefix_attention
from ..patching import patch_model
from ..prompts import PromptPool
from ..reference_prompts import gather_prompts as reference_gather, mix_prompts as reference_mix
from . import baselines
from .oracle import Oracle, greedy_no_cache
from .models import ModelShape, build_base, build_peft, explicit_pool_forward, token_batch

__all__ = ["Side", "Case", "attention_case", "gather_case", "mix_case", "train_case", "generate_case", "compared_sides",
           "trainable_parameters", "train_side", "patched_train_sides", "peft_train_sides", "no_prefix_side"]


@dataclass
class Side:
    step: Callable[[], Any]
    check: Callable[[], dict]
    exclude: list = field(default_factory=list)  # tensors alive before the step: not counted as saved activations


@dataclass
class Case:
    group: str      # "attention" | "prompts op" | "train step" | "generate"
    name: str
    params: dict
    build: Callable[[str], dict]  # device -> {"fastprompt": Side, "baseline": Side[, "no_prefix": Side]
    #                               [, "oracle": Oracle]}
    baseline: str = "peft"
    tol: float = 1e-4
    reps: int = 5
    tags: tuple = ()  # "reference" (the target shapes), "sweep_seq", "sweep_prefix" (chart series)
    # False: the sides run different methods on purpose (OS-Prompt's one-stage query vs the two-pass query), so
    # their outputs differ by design and are not compared (verdict "different method"); each is tested elsewhere
    same_method: bool = True

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


def compared_sides(built: dict) -> dict:
    """The timed and counted sides of a built case (its oracle, if any, is neither)."""
    return {name: side for name, side in built.items() if isinstance(side, Side)}


def _float64_truth(fn, inputs: dict, grad_of=(), grad_out=None) -> Callable[[], dict]:
    """An oracle computing `fn(**inputs)` in float64 from copies of the inputs; with `grad_of` (input names), also
    the gradients of <out, grad_out> with respect to them, keyed d<name>."""
    def truth():
        wide = {k: (v.detach().double().requires_grad_(k in grad_of) if isinstance(v, torch.Tensor)
                    and v.is_floating_point() else v) for k, v in inputs.items()}
        with torch.enable_grad():
            out = fn(**wide)
            result = {"out": out.detach()}
            if grad_of:
                grads = torch.autograd.grad(out, [wide[k] for k in grad_of], grad_out.double())
                result.update({f"d{k}": g for k, g in zip(grad_of, grads)})
        return result
    return truth


def _grads(loss_or_out, inputs, grad_out=None) -> tuple:
    return torch.autograd.grad(loss_or_out, inputs, grad_out, allow_unused=True)


# ------------------------------------------------------------------------------------------------------------------
# op level


def attention_case(kind: str, batch: int, seq: int, plen: int, hq: int = 8, hkv: int = 2, dim: int = 64,
                   dtype=torch.float32, tags=(), reps: int = 5) -> Case:
    """prefix attention, kind "fwd" | "fwd+bwd" | "decode" (Lq = 1 over a cache of `seq` tokens)."""

    def build(device):
        g = torch.Generator().manual_seed(0)

        def rnd(*shape, grad=False):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

        train = kind == "fwd+bwd"
        pk, pv = rnd(hkv, plen, dim, grad=train), rnd(hkv, plen, dim, grad=train)
        if kind == "decode":
            q, k_new, v_new = rnd(batch, hq, 1, dim), rnd(batch, hkv, 1, dim), rnd(batch, hkv, 1, dim)
            cache_k, cache_v = rnd(batch, hkv, seq, dim), rnd(batch, hkv, seq, dim)
            # PEFT's cache holds the prefix rows ahead of the tokens (built once at prefill: not part of the step)
            peft_k = torch.cat([baselines.prefix_rows(pk, batch), cache_k], dim=2)
            peft_v = torch.cat([baselines.prefix_rows(pv, batch), cache_v], dim=2)

            def fp_step():
                with torch.no_grad():
                    return baselines.fastprompt_decode(q, cache_k, cache_v, k_new, v_new, pk, pv)

            def peft_step():
                with torch.no_grad():
                    return baselines.peft_style_decode(q, peft_k, peft_v, k_new, v_new)

            keep = [q, k_new, v_new, cache_k, cache_v, pk, pv, peft_k, peft_v]
            truth = _float64_truth(
                lambda q, k, v, pk, pv: reference.prefix_attention(q, k, v, pk, pv, causal=True),
                dict(q=q, k=torch.cat([cache_k, k_new], 2), v=torch.cat([cache_v, v_new], 2), pk=pk, pv=pv))
            return {"fastprompt": Side(fp_step, lambda: {"out": fp_step()}, keep),
                    "baseline": Side(peft_step, lambda: {"out": peft_step()}, keep),
                    "oracle": Oracle(truth, "fastprompt.reference in float64", "the PEFT path", 1e-4)}

        q = rnd(batch, hq, seq, dim, grad=train)
        k, v = rnd(batch, hkv, seq, dim, grad=train), rnd(batch, hkv, seq, dim, grad=train)
        grad_out = rnd(batch, hq, seq, dim)
        leaves = (q, k, v, pk, pv)

        def run(attend):
            def step():
                out = attend(q, k, v, pk, pv)
                if not train:
                    return out
                return _grads(out, leaves, grad_out)

            def check():
                out = attend(q, k, v, pk, pv)
                result = {"out": out.detach()}
                if train:
                    result.update(zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), _grads(out, leaves, grad_out)))
                return result

            if not train:
                def step_no_grad():
                    with torch.no_grad():
                        return attend(q, k, v, pk, pv)
                return Side(step_no_grad, check, list(leaves) + [grad_out])
            return Side(step, check, list(leaves) + [grad_out])

        names = ("q", "k", "v", "prefix_k", "prefix_v")
        truth = _float64_truth(
            lambda q, k, v, prefix_k, prefix_v: reference.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True),
            dict(zip(names, leaves)), names if train else (), grad_out)
        return {"fastprompt": run(lambda *a: prefix_attention(*a, causal=True)),
                "baseline": run(baselines.peft_style_attention),
                "oracle": Oracle(truth, "fastprompt.reference in float64", "the PEFT path", 1e-4)}

    params = dict(kind=kind, B=batch, S=seq, P=plen, Hq=hq, Hkv=hkv, D=dim)
    return Case("attention", f"prefix attention {kind}", params, build, "peft", 1e-4, reps, tuple(tags))


def gather_case(batch: int, pool: int, length: int, width: int, reps: int = 5) -> Case:
    """gather_prompts(pool, index) forward + backward vs pool[index] (plain torch)."""

    def build(device):
        g = torch.Generator().manual_seed(0)
        table = torch.randn(pool, length, width, generator=g).to(device).requires_grad_()
        index = torch.randint(0, pool, (batch,), generator=g).to(device)
        grad_out = torch.randn(batch, length, width, generator=g).to(device)

        def side(fn):
            def step():
                return _grads(fn(), (table,), grad_out)

            def check():
                out = fn()
                return {"out": out.detach(), "dpool": _grads(out, (table,), grad_out)[0]}
            return Side(step, check, [table, index, grad_out])

        truth = _float64_truth(lambda pool, index: reference_gather(pool, index), dict(pool=table, index=index),
                               ("pool",), grad_out)
        return {"fastprompt": side(lambda: gather_prompts(table, index)), "baseline": side(lambda: table[index]),
                "oracle": Oracle(truth, "fastprompt.reference_prompts in float64", "plain torch", 1e-5)}

    return Case("prompts op", "gather_prompts fwd+bwd", dict(B=batch, N=pool, L=length, d=width), build, "torch",
                1e-5, reps)


def mix_case(batch: int, pool: int, length: int, width: int, reps: int = 5) -> Case:
    """mix_prompts(pool, weights) forward + backward vs einsum (plain torch)."""

    def build(device):
        g = torch.Generator().manual_seed(0)
        table = torch.randn(pool, length, width, generator=g).to(device).requires_grad_()
        weights = torch.softmax(torch.randn(batch, pool, generator=g), -1).to(device).requires_grad_()
        grad_out = torch.randn(batch, length, width, generator=g).to(device)

        def side(fn):
            def step():
                return _grads(fn(), (table, weights), grad_out)

            def check():
                out = fn()
                d_table, d_weights = _grads(out, (table, weights), grad_out)
                return {"out": out.detach(), "dpool": d_table, "dweights": d_weights}
            return Side(step, check, [table, weights, grad_out])

        truth = _float64_truth(lambda pool, weights: reference_mix(pool, weights), dict(pool=table, weights=weights),
                               ("pool", "weights"), grad_out)
        return {"fastprompt": side(lambda: mix_prompts(table, weights)),
                "baseline": side(lambda: torch.einsum("bn,nld->bld", weights, table)),
                "oracle": Oracle(truth, "fastprompt.reference_prompts in float64", "plain torch", 1e-5)}

    return Case("prompts op", "mix_prompts fwd+bwd", dict(B=batch, N=pool, L=length, d=width), build, "torch",
                1e-5, reps)


# ------------------------------------------------------------------------------------------------------------------
# end to end: one training step (forward + backward + AdamW step)


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def train_side(model, forward, params_for_check) -> Side:
    """forward() -> loss. step = forward + backward + AdamW step; check = loss and gradients, no step."""
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def check():
        named = params_for_check()
        loss = forward()
        grads = torch.autograd.grad(loss, [p for _, p in named])
        return {"loss": loss.detach(), **{f"grad {n}": g for (n, _), g in zip(named, grads)}}

    exclude = list(model.parameters()) + list(model.buffers())
    return Side(step, check, exclude)


def patched_train_sides(build_model: Callable[[], Any], batch: dict) -> dict:
    """{"baseline": a training step of the model `build_model()` returns, "fastprompt": the same on a second one,
    patched}; the loss is `model(**batch).loss`."""
    sides = {}
    for name, patch in (("baseline", False), ("fastprompt", True)):
        model = build_model()
        model.train()
        if patch:
            patch_model(model)

        def forward(model=model):
            return model(**batch).loss

        def named(model=model):
            return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        sides[name] = train_side(model, forward, named)
    return sides


def peft_train_sides(shape: ModelShape, method: str, plen: int, ids, mask, device) -> dict:
    """{"baseline": a PEFT training step, "fastprompt": the same PEFT model patched}, method "prefix" | "prompt"."""
    return patched_train_sides(lambda: build_peft(shape, method, plen, device),
                               dict(input_ids=ids, attention_mask=mask, labels=ids))


def no_prefix_side(shape: ModelShape, ids, mask, device) -> Side:
    """The frozen base model's step without any prompt (backward down to the input embeddings): what a prompt's
    extra cost is measured against."""
    base = build_base(shape, device)
    base.train()
    for p in base.parameters():
        p.requires_grad_(False)
    embed = base.get_input_embeddings()

    def no_prefix_step():
        embeds = embed(ids).detach().requires_grad_()
        base(inputs_embeds=embeds, attention_mask=mask, labels=ids).loss.backward()

    return Side(no_prefix_step, lambda: {}, list(base.parameters()) + list(base.buffers()))


def train_case(method: str, shape: ModelShape, batch: int, seq: int, plen: int, *, with_no_prefix: bool = False,
               tags=(), reps: int = 3) -> Case:
    """method "prefix" | "prompt" (PEFT vs the same PEFT model patched) or "pool" (fastprompt PromptPool, prefix
    placement, hard top-k, vs the same pool run the PEFT way: per-row prefixes in a DynamicCache)."""

    def build(device):
        ids = token_batch(batch, seq, shape.vocab, device)
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        sides = {}
        if method in ("prefix", "prompt"):
            sides.update(peft_train_sides(shape, method, plen, ids, mask, device))
        elif method == "pool":
            top_k = 4
            length = max(1, plen // top_k)
            query = None
            for name in ("baseline", "fastprompt"):
                model = build_base(shape, device)
                model.train()
                if query is None:
                    with torch.no_grad():
                        query = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.mean(dim=1)
                pool = PromptPool(model.config, pool_size=10, length=length, top_k=top_k, placement="prefix",
                                  seed=0).to(device)
                if name == "fastprompt":
                    patch_model(model, pool)

                    def forward(model=model):
                        return model(input_ids=ids, attention_mask=mask, labels=ids, prompt_query=query).loss
                else:
                    for p in model.parameters():
                        p.requires_grad_(False)
                    model.add_module("explicit_pool", pool)

                    def forward(model=model, pool=pool):
                        return explicit_pool_forward(model, pool, ids, query, labels=ids)[1]

                def named(pool=pool):
                    return [(n, p) for n, p in pool.named_parameters() if p.requires_grad]
                sides[name] = train_side(model, forward, named)
        else:
            raise ValueError(f"unknown method {method!r}")

        if with_no_prefix:
            sides["no_prefix"] = no_prefix_side(shape, ids, mask, device)
        return sides

    names = {"prefix": "prefix tuning", "prompt": "prompt tuning", "pool": "prompt pool (prefix, top-4)"}
    params = dict(model=shape.label(), B=batch, S=seq, P=plen)
    baseline = "explicit" if method == "pool" else "peft"
    return Case("train step", names[method], params, build, baseline, 2e-3, reps, tuple(tags))


# ------------------------------------------------------------------------------------------------------------------
# generation


def generate_case(shape: ModelShape, batch: int, seq: int, plen: int, new_tokens: int, tasks: int = 1,
                  reps: int = 3) -> Case:
    """Greedy batched generation with prefix tuning. tasks == 1: PEFT generate vs the patched model's.
    tasks > 1 (mixed-task batch): one PEFT prefix adapter per task; PEFT runs one batch per task (set_adapter),
    fastprompt runs the whole mixed batch once, each row reading its task's prefix (a prefix pool + task ids)."""

    def build(device):
        ids = token_batch(batch, seq, shape.vocab, device, seed=1)
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        task_ids = torch.arange(batch, device=device) % tasks
        gen = dict(max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)

        peft_model = build_peft(shape, "prefix", plen, device, adapters=tasks).eval()
        fp_model = build_peft(shape, "prefix", plen, device, adapters=tasks).eval()
        patch_model(fp_model)

        def peft_step():
            with torch.no_grad():
                if tasks == 1:
                    return peft_model.generate(input_ids=ids, attention_mask=mask, **gen)
                out = torch.empty(batch, seq + new_tokens, dtype=ids.dtype, device=device)
                for t in range(tasks):
                    rows = (task_ids == t).nonzero().flatten()
                    peft_model.set_adapter(f"task{t}")
                    out[rows] = peft_model.generate(input_ids=ids[rows], attention_mask=mask[rows], **gen)
                peft_model.set_adapter("task0")
                return out

        if tasks == 1:
            def fp_step():
                with torch.no_grad():
                    return fp_model.generate(input_ids=ids, attention_mask=mask, **gen)
        else:
            def fp_step():
                with torch.no_grad():
                    per_task = []
                    for t in range(tasks):  # each adapter's prefix, once (not per row)
                        fp_model.set_adapter(f"task{t}")
                        per_task.append(prefix_layer_kv(fp_model))
                    fp_model.set_adapter("task0")
                    pooled = {layer: LayerPrefix(torch.stack([p[layer].key for p in per_task]),
                                                 torch.stack([p[layer].value for p in per_task]), index=task_ids)
                              for layer in per_task[0]}
                    with layer_prefixes(fp_model.get_base_model(), pooled):
                        return type(fp_model).generate(fp_model, input_ids=ids, attention_mask=mask, **gen)

        eos = peft_model.generation_config.eos_token_id  # held back by min_new_tokens = max_new_tokens
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

        def truth():  # greedy argmax over the unpatched PEFT model's full forward, no generation cache
            out = torch.empty(batch, seq + new_tokens, dtype=ids.dtype, device=device)
            for t in range(tasks):
                rows = (task_ids == t).nonzero().flatten()
                peft_model.set_adapter(f"task{t}")
                out[rows] = greedy_no_cache(
                    lambda i, m: peft_model(input_ids=i, attention_mask=m).logits,
                    ids[rows], mask[rows], new_tokens, banned=eos_ids)
            peft_model.set_adapter("task0")
            return {"tokens": out}

        keep = list(peft_model.parameters()) + list(fp_model.parameters())
        return {"fastprompt": Side(fp_step, lambda: {"tokens": fp_step()}, keep),
                "baseline": Side(peft_step, lambda: {"tokens": peft_step()}, keep),
                "oracle": Oracle(truth, "greedy argmax over the unpatched PEFT model's forward, no cache",
                                 "PEFT generate")}

    name = "generate, mixed-task batch" if tasks > 1 else "generate"
    params = dict(model=shape.label(), B=batch, S=seq, P=plen, new=new_tokens)
    if tasks > 1:
        params["tasks"] = tasks
    return Case("generate", name, params, build, "peft" if tasks == 1 else "peft, 1 batch/task", 0.0, reps)


# Public names of the helpers above for case modules in other files (cases_vision); the underscored names stay for
# the modules that import them already.
float64_truth, input_grads = _float64_truth, _grads
