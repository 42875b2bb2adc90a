"""Per-call state: what one model call computes travels with that call, never as state on the shared model.

Threads (a web server's pool) and asyncio tasks call one patched model at once, so nothing a call computes (the
layer prefixes it hands to the attention, the prompt K/V that hoisting captures, a pool's query pass, generate()'s
prompt state) may be stored on the model or its modules, where another call would read or overwrite it. The parts
of the integration that need a value deeper in the same call (a layer's forward pre-hook, the registered attention
function) read it from a `CallLocal`: a `contextvars.ContextVar` holding a small mapping, set for the duration of a
block. A context variable is local to its thread and to its asyncio task, and the mapping is replaced, never
mutated, so a task that inherited a copy of the context never sees a later call's values.

Keys are objects compared by identity (a model's attention state, a layer module); they are held only while the
block runs. `AttentionCall` is what one call of a model switched to fastprompt's attention hands that attention,
bound per model attention state (`bound_call` / `current_call`).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

__all__ = ["CallLocal", "AttentionCall", "current_call", "bound_call"]


class CallLocal:
    """A value per key, visible to the calling thread / asyncio task inside a `bound(...)` block only."""

    def __init__(self, name: str):
        self._var: ContextVar = ContextVar(name, default=None)

    def get(self, key: Any, default: Any = None) -> Any:
        values = self._var.get()
        if values is None:
            return default
        return values.get(id(key), (None, default))[1]

    @contextmanager
    def bound(self, key: Any, value: Any) -> Iterator[Any]:
        with self.bound_many({key: value}):
            yield value

    @contextmanager
    def bound_many(self, items: Mapping[Any, Any]) -> Iterator[None]:
        values = self._var.get()
        new = dict(values) if values else {}
        for key, value in items.items():
            new[id(key)] = (key, value)  # the key is kept alive with its id while the block runs
        token = self._var.set(new)
        try:
            yield
        finally:
            self._var.reset(token)


@dataclass
class AttentionCall:
    """What one call of an enabled model hands its attention, bound to that call."""

    prefixes: Optional[Mapping] = None      # layer key (see transformers_attention.AttentionSlot) -> LayerPrefix
    capture: Optional[dict] = None          # prompt hoisting: layer -> (key, value) as the attention sees them
    position_shift: int = 0                 # encoder-decoder: how far the prefix moves learned decoder positions (BART)
    derived: dict = field(default_factory=dict)  # values derived once per call for every layer (T5's prefix bias)


_CALLS = CallLocal("fastprompt_attention_call")


def current_call(state) -> Optional[AttentionCall]:
    """The AttentionCall the current thread / task bound for the model owning the attention `state`, or None."""
    return _CALLS.get(state)


def bound_call(state, call: AttentionCall):
    """Context manager: inside the block, this thread's / task's calls of the model owning `state` read `call`."""
    return _CALLS.bound(state, call)
