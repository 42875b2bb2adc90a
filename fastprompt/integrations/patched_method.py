"""A patched method bound to one model instance that survives pickle, torch.save and copy.deepcopy."""
from __future__ import annotations

import inspect

__all__ = ["PatchedMethod", "ReplacedMethods"]


class PatchedMethod:
    """A module-level function bound to one model instance (a PeftModel), set as an instance attribute.

    Not a `types.MethodType`: a bound method pickles as `getattr(model, "<function name>")`, a name the PeftModel
    does not have (PEFT's __getattr__ then fails on the half-loaded model). This pickles as (function, model), so
    pickle, torch.save / torch.load and copy.deepcopy give a model that is still patched, bound to itself."""

    def __init__(self, func, model):
        self.__func__ = func
        self.__self__ = model

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return (PatchedMethod, (self.__func__, self.__self__))

    @property
    def __signature__(self):  # as a bound method's: without `self` (generate() validates kwargs against it)
        signature = inspect.signature(self.__func__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    @property
    def __name__(self):
        return self.__func__.__name__

    def __repr__(self):
        return f"<fastprompt-patched method {self.__func__.__name__} of {type(self.__self__).__name__}>"


class ReplacedMethods:
    """The one record of the instance attributes a patch replaced: for each (object, name), the object's own
    attribute before the patch (or that it had none) and what the patch put there. One record covers every object
    the patch touches (a model and, for the query pass, its decoder layers).

    A name replaced twice on one object by the same patch (PEFT's input-level methods, then prompt hoisting on top)
    keeps the attribute from before the FIRST replacement. `restore` puts back exactly what was recorded, newest
    first, and only where the attribute is still the one this record installed (an attribute someone set after
    patching is left alone); it is idempotent. Pickles and deep-copies with the objects (identities are preserved
    within one copy)."""

    def __init__(self):
        self.entries = []  # [object, name, had its own attribute, that attribute, what this record put there]

    def _entry(self, obj, name: str):
        for entry in self.entries:
            if entry[0] is obj and entry[1] == name:
                return entry
        return None

    def replace(self, obj, name: str, value) -> None:
        entry = self._entry(obj, name)
        if entry is None:
            entry = [obj, name, name in obj.__dict__, obj.__dict__.get(name), None]
            self.entries.append(entry)
        object.__setattr__(obj, name, value)
        entry[4] = value

    def installed(self, obj, name: str):
        """What this record put on `obj` as `name`, or None when it replaced nothing there."""
        entry = self._entry(obj, name)
        return None if entry is None else entry[4]

    def original(self, obj, name: str):
        """`obj`'s own attribute `name` before patching, or None when it had none (or nothing was replaced)."""
        entry = self._entry(obj, name)
        return None if entry is None else entry[3]

    def restore(self) -> None:
        for obj, name, had_own, original, installed in reversed(self.entries):
            if obj.__dict__.get(name) is installed:
                if had_own:
                    object.__setattr__(obj, name, original)
                else:
                    del obj.__dict__[name]
        self.entries = []
