"""The KV cache argument under both of its names: `past_key_values` (transformers < 5.24) and `cache` (5.24+).

transformers 5.24 renamed the models' `past_key_values` argument (and the generation kwargs / output field) to
`cache`; the old name stays a deprecated alias until 5.40. fastprompt reads the cache from whichever key a caller
used and passes it under the name the callee's signature takes, so the same code is right before the rename, after
it, and once the alias is gone.
"""
from __future__ import annotations

import inspect
from typing import Any, MutableMapping, Optional

from transformers.generation.utils import GenerationMixin

CACHE_KEYS = ("cache", "past_key_values")  # the new name first: when both are given, transformers uses `cache`

__all__ = ["CACHE_KEYS", "get_cache", "pop_cache", "set_cache", "cache_kwarg", "cache_length", "output_cache",
           "returned_cache"]


def get_cache(kwargs: MutableMapping[str, Any]) -> Any:
    """The cache a caller passed, under either name (None when absent)."""
    for key in CACHE_KEYS:
        value = kwargs.get(key)
        if value is not None:
            return value
    return None


def pop_cache(kwargs: MutableMapping[str, Any]) -> Any:
    """Remove the cache under both names; returns it (None when absent)."""
    found = None
    for key in CACHE_KEYS:
        value = kwargs.pop(key, None)
        if found is None:
            found = value
    return found


def set_cache(kwargs: MutableMapping[str, Any], cache: Any, key: str) -> None:
    """Put `cache` under `key` only (the other name removed, so a callee never sees two caches)."""
    for other in CACHE_KEYS:
        kwargs.pop(other, None)
    kwargs[key] = cache


def cache_kwarg(fn) -> str:
    """The name `fn` (a callable or its inspect.Signature) takes the cache under: the one its signature names;
    for a callable that takes it through **kwargs only, the name the installed transformers uses."""
    try:
        params = (fn if isinstance(fn, inspect.Signature) else inspect.signature(fn)).parameters
    except (TypeError, ValueError):
        return _library_default()
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    return _library_default()


_default: Optional[str] = None


def _library_default() -> str:
    """What the installed transformers calls it, from its own base model's generation entry point."""
    global _default
    if _default is None:
        try:
            params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
            _default = "cache" if "cache" in params else "past_key_values"
        except Exception:  # an unexpected layout: the old name is accepted by every release that has the alias
            _default = "past_key_values"
    return _default


def cache_length(cache: Any) -> int:
    """Number of tokens a cache holds (0 for None / an empty cache); legacy tuples too."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def output_cache(output: Any) -> Any:
    """The cache a model / generate() output carries, under either field name."""
    for key in CACHE_KEYS:
        try:
            value = output[key] if hasattr(output, "keys") and key in output.keys() else getattr(output, key, None)
        except (KeyError, AttributeError):
            value = None
        if value is not None:
            return value
    return None


def returned_cache(output: Any, passed: Any = None) -> Any:
    """The cache a call filled: the one it was passed, else the one its output carries (a ModelOutput, or the tuple
    of return_dict=False, where it is the entry that is a cache)."""
    if passed is not None:
        return passed
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return next((item for item in output if hasattr(item, "get_seq_length")), None)
    return output_cache(output)
