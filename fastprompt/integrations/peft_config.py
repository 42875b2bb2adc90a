"""PEFT config fields as plain names.

PEFT stores `peft_type` and `task_type` as str-valued enums (`PeftType.PREFIX_TUNING`), but a config loaded from
JSON or built by hand may hold the plain string; fastprompt compares names, so it reads both the same way."""
from __future__ import annotations

__all__ = ["enum_value"]


def enum_value(x):
    """`x.value` for an enum member, `x` itself for a plain string (or None)."""
    return getattr(x, "value", x)
