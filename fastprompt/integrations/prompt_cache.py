"""What a KV cache holds of an input-level prompt, carried by the cache object itself.

An input-level prompt (prompt tuning, P-tuning, multitask prompts, pools placed at the input) reaches a KV cache in
one of two layouts: "inline" (the unhoisted path ran `[prompt; tokens]`, so the cache starts with the P virtual
tokens) or "hoisted" (the cache holds the real tokens only; the prompt's K/V come from the prompt pass and are read
as a prefix). A decoding step must know which, and what was chosen at prefill (a pool's query, the prompt rows of
multitask prompt tuning). Keyed by the cache object's identity, that knowledge was lost by every other cache that
holds the same tokens: the cache a forward returns when it made its own (`use_cache=True`), a `copy.deepcopy` of a
prompt cache, a user's cache. So it travels inside the cache: `PromptInCache` is an attribute of the cache object,
which copies and deep copies carry. A cache without it is told apart by its length against the attention mask
(`layout_from_lengths`), and one that cannot be told apart is refused with an error, never decoded on a guess.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

__all__ = ["HOISTED", "INLINE", "PromptInCache", "mark_cache", "prompt_in_cache", "layout_from_lengths"]

HOISTED = "hoisted"   # the cache holds the real tokens only
INLINE = "inline"     # the cache holds the P virtual tokens, then the real tokens

_ATTR = "_fastprompt_prompt_in_cache"


@dataclass
class PromptInCache:
    layout: str                              # HOISTED | INLINE
    virtual_tokens: int                      # P: what the prompt adds in front of the real tokens
    prompt_kv: Optional[dict] = None         # HOISTED: layer -> (key, value) [U, Hkv, P, D], detached
    unique_tasks: Optional[Tensor] = None    # HOISTED multitask prompts: the task id of each prompt row
    query: Optional[Tensor] = None           # pools / selectors: each row's query, chosen at prefill


def mark_cache(cache: Any, record: PromptInCache) -> None:
    """Store what `cache` holds of the prompt in the cache object (legacy tuples cannot carry it: they stay
    unmarked and are told apart by their length)."""
    if cache is None:
        return
    try:
        object.__setattr__(cache, _ATTR, record)
    except (AttributeError, TypeError):
        pass


def prompt_in_cache(cache: Any) -> Optional[PromptInCache]:
    return getattr(cache, _ATTR, None) if cache is not None else None


def layout_from_lengths(cache_length: int, attention_mask: Optional[Tensor], seq: int, virtual_tokens: int,
                        what: str) -> str:
    """The layout of a cache that carries no record, from its length: the 2D attention mask of a decoding step
    covers the cached real tokens and the new ones, so a cache of `mask - seq` tokens holds real tokens only and
    one of `mask - seq + P` starts with the prompt. Raises when the lengths cannot tell."""
    if attention_mask is None or attention_mask.dim() != 2:
        raise ValueError(
            f"fastprompt: {what} got a KV cache of {cache_length} tokens that this patched model did not fill (a "
            "cache made elsewhere, or one whose record was dropped), and no 2D attention_mask: it cannot tell "
            f"whether the cache starts with the prompt's {virtual_tokens} virtual tokens. Pass attention_mask "
            "covering the cached and the new tokens, or fill the cache with this patched model")
    real = attention_mask.shape[1] - seq
    if cache_length == real:
        return HOISTED
    if cache_length == real + virtual_tokens:
        return INLINE
    raise ValueError(
        f"fastprompt: {what} got a KV cache of {cache_length} tokens, but attention_mask says {real} real tokens "
        f"precede the {seq} new ones: the cache should hold {real} (real tokens only) or {real + virtual_tokens} "
        f"(the prompt's {virtual_tokens} virtual tokens first) tokens")
