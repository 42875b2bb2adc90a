"""A patched method bound to one model instance that survives pickle, torch.save and copy.deepcopy."""
from __future__ import annotations

__all__ = ["PatchedMethod"]


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
        import inspect

        signature = inspect.signature(self.__func__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    @property
    def __name__(self):
        return self.__func__.__name__

    def __repr__(self):
        return f"<fastprompt-patched method {self.__func__.__name__} of {type(self.__self__).__name__}>"
