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
    """The one record of the instance attributes a patch replaced on one object: for each name, the object's own
    attribute before the patch (or that it had none) and what the patch put there.

    A name replaced twice by the same patch (PEFT's input-level methods, then prompt hoisting on top) keeps the
    attribute from before the FIRST replacement. `restore` puts back exactly what was recorded, and only where the
    attribute is still the one this record installed (an attribute someone set after patching is left alone); it
    is idempotent. Pickles and deep-copies with the object (identities are preserved within one copy)."""

    def __init__(self):
        self.originals = {}      # name -> the object's own attribute before the first replacement
        self.absent = set()      # names the object had no instance attribute for
        self.installed = {}      # name -> what this record put there last

    def replace(self, obj, name: str, value) -> None:
        if name not in self.installed:
            if name in obj.__dict__:
                self.originals[name] = obj.__dict__[name]
            else:
                self.absent.add(name)
        object.__setattr__(obj, name, value)
        self.installed[name] = value

    def names(self) -> tuple:
        return tuple(self.installed)

    def original(self, name: str):
        """The object's own attribute `name` before patching, or None when it had none."""
        return self.originals.get(name)

    def restore(self, obj) -> None:
        for name in reversed(list(self.installed)):
            if obj.__dict__.get(name) is self.installed[name]:
                if name in self.absent:
                    del obj.__dict__[name]
                else:
                    object.__setattr__(obj, name, self.originals[name])
        self.originals, self.absent, self.installed = {}, set(), {}
