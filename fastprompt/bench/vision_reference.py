"""The vision continual-learning baselines: what the reference implementations run, on a Hugging Face ViT.

l2p-pytorch, dualprompt-pytorch and GT-RIPL/CODA-Prompt (and the toolboxes that bundle them) share one attention
class whose forward, given a layer's prompt, builds the prefix the slow way:

    k = torch.cat([key_prefix, k], dim=2); v = torch.cat([value_prefix, v], dim=2)
    attn = (q @ k.transpose(-2, -1)) * self.scale; attn = attn.softmax(dim=-1); x = attn @ v

with per-row key / value prefixes `[B, H, P, D]` materialized by the prompt module, and they compute the query that
picks the prompts with a second forward of the frozen ViT without prompts (under no_grad), whose [CLS] pre-logits
(the final norm's output at [CLS]) is the query.

Here that attention is registered as a transformers attention function ("fastprompt_bench_concat_eager", or
"fastprompt_bench_concat_sdpa": the same concatenated K/V through F.scaled_dot_product_attention) and set on the
baseline's own copy of the model, so both sides of a pair share every weight and every other op (HF's q/k/v
projections instead of timm's fused qkv, on both sides alike). Each attention module of the copy is told its layer
index once, at build time; the per-row prefixes of a call travel in a context variable, bound for that call.

The prompt modules are written as the reference code computes them, from a fastprompt prompt's values:
- DualPrompt (dualprompt-pytorch, prefix-tune G and E prompts): the G-prompt expanded to B rows; the E entry per
  row the task's (training) or the top-1 cosine match of the query with the keys (inference), gathered from the
  pool (`self.prompt[:, :, idx]`); reduce_sim = the chosen cosines' sum / B, loss - pull_constraint_coeff * it;
- CODA-Prompt (models/zoo.py): K, A, P the slices in use (earlier ones detached in training), aq_k = cos(q * A, K)
  by einsum, P_ = einsum('bk,kld->bld', aq_k, P), its first half the key prefix and the rest the value prefix,
  reshaped to heads as vit.py does.
"""
from __future__ import annotations

import copy
from contextvars import ContextVar
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import eager_mask, sdpa_mask

from fastprompt.integrations.transformers_attention import find_layers

try:
    from transformers import AttentionMaskInterface
except ImportError:  # older 5.x export it from masking_utils only
    from transformers.masking_utils import AttentionMaskInterface

__all__ = ["EAGER", "SDPA", "ReferenceDualPrompt", "ReferenceCodaPrompt", "ReferencePromptedViT", "reference_model"]

EAGER = "fastprompt_bench_concat_eager"
SDPA = "fastprompt_bench_concat_sdpa"
_LAYER_ATTR = "_fastprompt_bench_layer"

# {layer index: (key prefix [B, H, P, D], value prefix)} of the baseline call in flight on this thread / task
_PREFIXES: ContextVar = ContextVar("fastprompt_bench_reference_prefixes", default=None)


def _concat(module, key, value):
    prefix = (_PREFIXES.get() or {}).get(getattr(module, _LAYER_ATTR, None))
    if prefix is None:
        return key, value
    return torch.cat([prefix[0].to(key.dtype), key], dim=2), torch.cat([prefix[1].to(value.dtype), value], dim=2)


def concat_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The reference implementations' Attention.forward with a prompt (ViTs take no attention mask)."""
    if attention_mask is not None:
        raise ValueError("the reference vision attention takes no attention mask")
    key, value = _concat(module, key, value)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    attn = (query @ key.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, p=dropout, training=module.training)
    return (attn @ value).transpose(1, 2).contiguous(), attn


def concat_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The same concatenated K/V through PyTorch's fused attention."""
    if attention_mask is not None:
        raise ValueError("the reference vision attention takes no attention mask")
    key, value = _concat(module, key, value)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout if module.training else 0.0,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    AttentionInterface.register(EAGER, concat_eager_attention)
    AttentionInterface.register(SDPA, concat_sdpa_attention)
    AttentionMaskInterface.register(EAGER, eager_mask)
    AttentionMaskInterface.register(SDPA, sdpa_mask)
    _registered = True


def reference_model(model, attention: str):
    """A copy of the unpatched `model` running the reference attention (EAGER or SDPA), every weight frozen."""
    _register()
    twin = copy.deepcopy(model)
    twin.set_attn_implementation(attention)
    for i, layer in enumerate(find_layers(twin.base_model)[1]):
        attn = layer.attention if hasattr(layer, "attention") else layer.self_attn
        object.__setattr__(attn, _LAYER_ATTR, i)  # which prefix is this layer's: fixed at build, not per call
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class ReferenceDualPrompt(nn.Module):
    """dualprompt-pytorch's G- and E-prompts (prefix tuning), starting from a fastprompt DualPrompt's values."""

    def __init__(self, prompt):
        super().__init__()
        c = prompt.config
        self.g_layers, self.e_layers, self.coeff = tuple(c.g_layers), tuple(c.e_layers), c.pull_constraint_coeff
        self.g_prompt = nn.Parameter(prompt.g_prompt.detach().clone())  # [Lg, 2, H, Pg, D]
        self.e_pool = nn.Parameter(prompt.e_pool.detach().clone())      # [Le, 2, N, H, Pe, D]
        self.e_keys = nn.Parameter(prompt.e_keys.detach().clone())      # [N, hidden]

    def prefixes(self, query: Tensor, task_ids: Optional[Tensor] = None) -> Tuple[Dict[int, tuple], Tensor]:
        batch = query.shape[0]
        sim = F.normalize(query, dim=-1) @ F.normalize(self.e_keys, dim=-1).t()  # [B, N]
        idx = task_ids if task_ids is not None else torch.topk(sim, k=1, dim=1).indices[:, 0]
        reduce_sim = sim[torch.arange(batch, device=sim.device), idx].sum() / batch
        prefixes = {}
        for i, layer in enumerate(self.g_layers):
            g = self.g_prompt[i].unsqueeze(1).expand(-1, batch, -1, -1, -1)  # the shared G-prompt, B rows
            prefixes[layer] = (g[0], g[1])
        for i, layer in enumerate(self.e_layers):
            e = self.e_pool[i][:, idx]  # [2, B, H, Pe, D]: each row's entry, gathered
            prefixes[layer] = (e[0], e[1])
        return prefixes, -self.coeff * reduce_sim


class ReferenceCodaPrompt(nn.Module):
    """CODA-Prompt's zoo.py CodaPrompt at the task a fastprompt CodaPrompt is at, starting from its values."""

    def __init__(self, prompt):
        super().__init__()
        c = prompt.config
        self.layers, self.length, self.task = tuple(prompt.layers), c.length, prompt.task
        self.heads, self.head_dim = c.num_kv_heads, c.head_dim
        for name in ("components", "keys", "attention_vectors"):  # the fastprompt prompt's names and slices
            setattr(self, name, nn.ParameterList(
                [nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in getattr(prompt, name)]))

    def _in_use(self, slices) -> Tensor:
        """[L, f, ...]: zoo.py's torch.cat((K[:s].detach().clone(), K[s:f])) in training, K[0:f] otherwise."""
        parts = [p.detach().clone() if (self.training and t < self.task) else p
                 for t, p in enumerate(list(slices)[: self.task + 1])]
        return torch.cat(parts, dim=1)

    def prefixes(self, query: Tensor, task_ids: Optional[Tensor] = None) -> Tuple[Dict[int, tuple], None]:
        batch = query.shape[0]
        K, A, p = (self._in_use(s) for s in (self.keys, self.attention_vectors, self.components))
        half = self.length // 2
        prefixes = {}
        for i, layer in enumerate(self.layers):
            a_querry = torch.einsum("bd,kd->bkd", query, A[i])
            n_K = F.normalize(K[i], dim=1)
            q = F.normalize(a_querry, dim=2)
            aq_k = torch.einsum("bkd,kd->bk", q, n_K)
            P_ = torch.einsum("bk,kld->bld", aq_k, p[i])
            Ek, Ev = P_[:, :half, :], P_[:, half:, :]
            prefixes[layer] = tuple(x.reshape(batch, -1, self.heads, self.head_dim).permute(0, 2, 1, 3)
                                    for x in (Ek, Ev))
        return prefixes, None


class ReferencePromptedViT(nn.Module):
    """The reference step: the frozen model's query pass, the prompt module, the prompted pass with the reference
    attention. `model` is a `reference_model` copy; `prompt` a Reference*Prompt."""

    def __init__(self, model, prompt):
        super().__init__()
        self.model, self.prompt = model, prompt

    def query(self, pixel_values: Tensor) -> Tensor:
        """The second forward of the reference code: the frozen ViT without prompts, its [CLS] pre-logits."""
        token = _PREFIXES.set({})
        try:
            with torch.no_grad():
                return self.model.base_model(pixel_values=pixel_values).last_hidden_state[:, 0]
        finally:
            _PREFIXES.reset(token)

    def forward(self, pixel_values: Tensor, labels: Optional[Tensor] = None, task_ids: Optional[Tensor] = None):
        """(logits, loss or None): the model's loss plus the prompt's (DualPrompt's key pull)."""
        # a plain method, not the module's __call__: FlopCounterMode's module tracker asserts on a module output
        # that is a view of a parameter taken under no_grad (the G-prompt's expand at inference)
        prefixes, aux = self.prompt.prefixes(self.query(pixel_values), task_ids)
        token = _PREFIXES.set(prefixes)
        try:
            out = self.model(pixel_values=pixel_values, labels=labels)
        finally:
            _PREFIXES.reset(token)
        loss = out.loss
        if loss is not None and aux is not None:
            loss = loss + aux
        return out.logits, loss
