"""Common base for fastprompt's own prompt methods: a JSON-serializable config and a module contract.

A prompt module produces, once per step, either input-level prompt embeddings (`input_prompts`) or per-layer
prefix K/V (`layer_prefixes`); fastprompt.integrations.prompt_attach feeds them to the model. Shared prompts stay
[P, d] / [Hkv, P, D] (the integration broadcasts them with expand); per-sample prompts are [B, ...]; pooled prefixes
stay [N, Hkv, P, D] with an index, read in place by prefix_attention.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterable, Mapping, Optional, Tuple, Type

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .encoder import resolve_custom_encoder
from .layer_prefix import LayerPrefix

# The submodule name under which fastprompt.patch_model attaches a prompt to a model (its integrations attach it;
# param_groups finds it there: the prompts layer names it so that it never imports the integrations).
ATTACHED_PROMPT_NAME = "fastprompt_prompt"

CONFIG_NAME = "fastprompt_config.json"
WEIGHTS_NAME = "fastprompt_prompt.safetensors"
FORMAT_VERSION = 1

PLACEMENTS = ("input", "prefix")
QUERY_MODES = ("mean", "cls", "last", "embeddings")
# Where a query-selected prompt (PromptPool, DualPrompt, CodaPrompt) takes its query from. "two_pass" (the default,
# exact): the frozen model's encoding of the input from a first pass without prompts, as the reference
# implementations do. "one_stage": OS-Prompt (Kim et al., ECCV 2024), a DIFFERENT method: the [CLS] (or token mean)
# of the hidden state entering a prompted layer of the prompted pass itself, one forward instead of two
# (fastprompt.integrations.one_stage_query; Vision Transformers only).
QUERY_PASSES = ("two_pass", "one_stage")

_PROMPT_CLASSES: Dict[str, Type["PromptModule"]] = {}


def register_prompt(cls):
    """Class decorator: lets fastprompt.load_prompt rebuild `cls` from its saved config."""
    _PROMPT_CLASSES[cls.__name__] = cls
    return cls


def prompt_class(name: str) -> Type["PromptModule"]:
    if name not in _PROMPT_CLASSES:
        raise ValueError(f"unknown prompt type {name!r}; known: {sorted(_PROMPT_CLASSES)}")
    return _PROMPT_CLASSES[name]


def model_dims(model_or_config) -> Dict[str, Any]:
    """The sizes a prompt depends on, read from a transformers model or config (GPT-2 names included)."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head", "num_heads")
    if hidden is None or layers is None or heads is None:
        raise ValueError(
            f"cannot read hidden_size / num_hidden_layers / num_attention_heads from {type(config).__name__}"
        )
    if getattr(config, "is_heterogeneous", False):
        # per-layer attention shapes (Gemma 4; reading config.head_dim raises there): the widest layer's, as PEFT
        # sizes its prefix; attach refuses prefix prompts on such models (one prefix shape cannot fit every layer)
        layer = max(config.per_layer_config[:int(layers)], key=lambda c: getattr(c, "head_dim", None) or 0)
        kv_heads = getattr(layer, "num_key_value_heads", None) or heads
        head_dim = getattr(layer, "head_dim", None) or hidden // heads
    else:
        kv_heads = get("num_key_value_heads", "n_head_kv") or heads
        head_dim = get("head_dim", "d_kv") or hidden // heads  # d_kv: T5 / mT5 (Flan-T5 small: 512 // 6 != 64)
    # Factorized input embeddings (ELECTRA, ALBERT): the word embeddings are embedding_size wide and a projection
    # (ELECTRA's embeddings_project) lifts them to hidden_size inside the model; input-level prompts are prepended
    # to the word embeddings, so they live in that narrower space. 0 = no factorization (the prompt is hidden_size).
    embedding = get("embedding_size")
    embedding = int(embedding) if embedding is not None and int(embedding) != int(hidden) else 0
    return dict(
        hidden_size=int(hidden),
        embedding_size=embedding,
        num_layers=int(layers),
        num_heads=int(heads),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        model_type=str(getattr(config, "model_type", "") or ""),
    )


@dataclass
class PromptConfig:
    """Model sizes shared by every method; subclasses add the method's own fields (all JSON-serializable)."""

    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    model_type: str = ""
    embedding_size: int = 0  # width of the model's input embeddings when it differs from hidden_size (ELECTRA)

    prompt_type: ClassVar[str] = ""

    @property
    def input_width(self) -> int:
        """The width of input-level prompts: the word embeddings' (embedding_size) where the model factorizes them,
        else hidden_size."""
        return int(self.embedding_size) or int(self.hidden_size)

    @classmethod
    def from_model_config(cls, model_or_config, **kwargs) -> "PromptConfig":
        dims = model_dims(model_or_config)
        dims.update(kwargs)
        return cls(**dims)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if int(self.embedding_size) < 0:
            raise ValueError(f"embedding_size must be >= 0 (0 = hidden_size), got {self.embedding_size!r}")

    def to_dict(self) -> Dict[str, Any]:
        out = {"prompt_type": self.prompt_type, "format_version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PromptConfig":
        data = dict(data)
        data.pop("format_version", None)
        saved_type = data.pop("prompt_type", cls.prompt_type)
        if cls.prompt_type and saved_type != cls.prompt_type:
            raise ValueError(f"config is for {saved_type!r}, not {cls.prompt_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fields for {cls.__name__}: {sorted(unknown)}")
        for f in dataclasses.fields(cls):
            if f.name in data and isinstance(data[f.name], list):
                data[f.name] = tuple(data[f.name])
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str) -> "PromptConfig":
        if os.path.exists(text_or_path):
            with open(text_or_path) as fh:
                text_or_path = fh.read()
        return cls.from_dict(json.loads(text_or_path))


def normalize_layers(layers: Optional[Iterable[int]], num_layers: int, name: str = "layers") -> Tuple[int, ...]:
    """None -> every layer; else a sorted tuple of distinct layer indices, negatives counted from the end."""
    if layers is None:
        return tuple(range(num_layers))
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{name} must hold ints, got {layer!r}")
        idx = layer + num_layers if layer < 0 else layer
        if not 0 <= idx < num_layers:
            raise ValueError(f"{name} entry {layer} is out of range for a model with {num_layers} layers")
        out.append(idx)
    if not out:
        raise ValueError(f"{name} must name at least one layer")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicates: {tuple(layers)}")
    return tuple(sorted(out))


def check_query_pass(config) -> None:
    """Validate `config.query_pass` (and what one_stage excludes)."""
    if config.query_pass not in QUERY_PASSES:
        raise ValueError(f"query_pass must be one of {QUERY_PASSES}, got {config.query_pass!r}")
    if config.query_pass == "one_stage":
        if getattr(config, "query_layer", None) is not None:
            raise ValueError("query_pass='one_stage' reads its query inside the prompted pass; query_layer (a layer "
                             "of a first pass without prompts) does not apply: leave query_layer=None")
        if config.query not in ("cls", "mean"):
            raise ValueError(f"query_pass='one_stage' takes the query from a hidden state: query='cls' (OS-Prompt) "
                             f"or 'mean', got {config.query!r}")


def layer_prefix_class():
    """The LayerPrefix fastprompt's attention reads (fastprompt.prompts.layer_prefix)."""
    return LayerPrefix


def check_task_ids(task_ids: Optional[Tensor], num_tasks: int, batch_size: Optional[int], device) -> Tensor:
    if task_ids is None:
        raise ValueError("this prompt needs task_ids: pass task_ids=LongTensor[B] to the model call")
    if not isinstance(task_ids, torch.Tensor):
        task_ids = torch.as_tensor(task_ids)
    if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise TypeError(f"task_ids must be an integer tensor, got dtype {task_ids.dtype}")
    if task_ids.dim() == 0:
        task_ids = task_ids.reshape(1).expand(batch_size or 1)
    if task_ids.dim() != 1 or (batch_size is not None and task_ids.shape[0] != batch_size):
        raise ValueError(f"task_ids must be [B] with B = {batch_size}, got shape {tuple(task_ids.shape)}")
    if task_ids.numel():
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < 0 or hi >= num_tasks:
            bad = lo if lo < 0 else hi
            raise ValueError(f"unknown task id {bad}: this prompt has {num_tasks} tasks (ids 0..{num_tasks - 1})")
    return task_ids.to(device=device, dtype=torch.long)


# What the last call of each prompt module computed besides its prompts (a pool's key-pull loss and choice), per
# thread / asyncio task: {(id(module), name): (weakref to the module, value)}, replaced on every write (never
# mutated), so concurrent calls of one shared module never read each other's.
_LAST_CALL: ContextVar = ContextVar("fastprompt_prompt_last_call", default=None)


class PerCallAttribute:
    """A module attribute that holds what the last call in the CURRENT thread / asyncio task set (None before any).

    The prompt modules record per-call results (`aux_loss`, `last_index`, `last_weights`) as attributes, which a
    model served from several threads would otherwise share: a thread reads its own call's value."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, module, owner=None):
        if module is None:
            return self
        entry = (_LAST_CALL.get() or {}).get((id(module), self.name))
        return entry[1] if entry is not None and entry[0]() is module else None

    def __set__(self, module, value):
        values = {key: entry for key, entry in (_LAST_CALL.get() or {}).items() if entry[0]() is not None}
        values[(id(module), self.name)] = (weakref.ref(module), value)
        _LAST_CALL.set(values)


class PromptModule(nn.Module):
    """Base of every fastprompt prompt method.

    Subclasses set `config_class`, build parameters from `self.config`, and implement `input_prompts` (placement
    "input") or `layer_prefixes` (placement "prefix").
    """

    config_class: ClassVar[Type[PromptConfig]] = PromptConfig
    needs_task_ids: ClassVar[bool] = False
    # per-call results, local to the calling thread / asyncio task (see PerCallAttribute)
    aux_loss = PerCallAttribute()
    last_index = PerCallAttribute()
    last_weights = PerCallAttribute()

    def __init__(self, config: PromptConfig):
        super().__init__()
        config.validate()
        self.config = config

    @classmethod
    def _make_config(cls, config, kwargs) -> PromptConfig:
        if isinstance(config, cls.config_class):
            return dataclasses.replace(config, **kwargs) if kwargs else config
        if isinstance(config, PromptConfig):
            raise TypeError(f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}")
        return cls.config_class.from_model_config(config, **kwargs)

    # ---- what the integration asks -------------------------------------------------------------------------
    @property
    def placement(self) -> str:
        return getattr(self.config, "placement", "input")

    @property
    def needs_query(self) -> bool:
        return False

    @property
    def query_mode(self) -> str:
        return getattr(self.config, "query", "mean")

    def num_input_tokens(self) -> int:
        """How many virtual tokens input placement prepends."""
        raise NotImplementedError

    def input_prompts(self, batch_size: int, *, query: Optional[Tensor] = None,
                      task_ids: Optional[Tensor] = None) -> Tensor:
        """[P, d] (shared by the batch) or [B, P, d]."""
        raise NotImplementedError(f"{type(self).__name__} has no input-level prompts")

    def layer_prefixes(self, batch_size: int, *, query: Optional[Tensor] = None,
                       task_ids: Optional[Tensor] = None) -> Dict[int, Any]:
        """{layer index: LayerPrefix}."""
        raise NotImplementedError(f"{type(self).__name__} has no per-layer prefixes")

    # ---- the one-stage query (query_pass="one_stage", OS-Prompt) -------------------------------------------
    @property
    def one_stage(self) -> bool:
        return getattr(self.config, "query_pass", "two_pass") == "one_stage"

    @property
    def query_layers(self) -> Tuple[int, ...]:
        """One-stage: the layers at whose entry the prompted pass's hidden state gives a query."""
        raise NotImplementedError(f"{type(self).__name__} has no one-stage query")

    def one_stage_prefixes(self, batch_size: int, layer: Optional[int], query: Optional[Tensor], *,
                           task_ids: Optional[Tensor] = None) -> Dict[int, Any]:
        """One-stage: layer None -> the prefixes that need no query (set before the pass; resets the per-call
        results); else {layer index: LayerPrefix} of the prefixes that the query read entering `layer` decides."""
        raise NotImplementedError(f"{type(self).__name__} has no one-stage query")

    # ---- compatibility -------------------------------------------------------------------------------------
    def check_compatible(self, model_or_config) -> None:
        """Raise ValueError when this prompt was built for a model of another shape."""
        dims = model_dims(model_or_config)
        keys = ["hidden_size"] if self.placement == "prefix" else ["hidden_size", "embedding_size"]
        if self.placement == "prefix":
            keys += ["num_layers", "num_kv_heads", "head_dim"]
        mismatched = [k for k in keys if int(getattr(self.config, k)) != dims[k]]
        if mismatched:
            detail = ", ".join(f"{k}: prompt {getattr(self.config, k)} vs model {dims[k]}" for k in mismatched)
            raise ValueError(
                f"{type(self).__name__} was built for another model shape ({detail}); build or load a prompt "
                f"for this model"
            )

    # ---- persistence ---------------------------------------------------------------------------------------
    def save_pretrained(self, path: str) -> None:
        """Write fastprompt_config.json + fastprompt_prompt.safetensors into the folder `path`."""
        os.makedirs(path, exist_ok=True)
        self.config.to_json(os.path.join(path, CONFIG_NAME))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"prompt_type": type(self).__name__})

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "PromptModule":
        prompt = load_prompt(path, **kwargs)
        if not isinstance(prompt, cls):
            raise TypeError(f"{path} holds a {type(prompt).__name__}, not a {cls.__name__}")
        return prompt

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}"


def init_normal_(tensor: Tensor, std: float, generator: Optional[torch.Generator] = None) -> Tensor:
    with torch.no_grad():
        return tensor.normal_(0.0, std, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# loading (here, beside save_pretrained and the registry it reads; fastprompt.prompts.io is its public path)


def load_prompt(path: str, model=None, *, encoder=None, device=None,
                dtype: Optional[torch.dtype] = None) -> PromptModule:
    """Load a prompt saved with `prompt.save_pretrained(path)`.

    model: optional transformers model (or config); a prompt built for another model shape raises ValueError.
    encoder: for a prompt saved with a custom (user nn.Module) prompt encoder, the module to load its weights
    into: an instance, or a class / factory called with no arguments. Built-in encoders and task heads are
    rebuilt from the config alone.
    """
    # The method modules registered themselves when the fastprompt.prompts package (which imports them all, and
    # is imported before any of its modules) was first imported.
    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: is {path!r} a folder written by save_pretrained?")
    with open(config_path) as fh:
        data = json.load(fh)
    cls = prompt_class(data.get("prompt_type", ""))
    config = cls.config_class.from_dict(data)
    extra = {}
    if getattr(config, "encoder", None) == "custom":
        extra["encoder"] = resolve_custom_encoder(encoder, getattr(config, "encoder_class", ""))
    elif encoder is not None:
        raise ValueError(f"encoder= was given but the prompt in {path!r} has no custom encoder "
                         f"(its encoder is {getattr(config, 'encoder', None)!r})")
    # Build without the init cost of text/vocab init: the weights are overwritten below.
    if getattr(config, "init", None) in ("vocab", "text"):
        prompt = cls(dataclasses.replace(config, init="random"), **extra)
        prompt.config = config
    else:
        prompt = cls(config, **extra)

    state = load_file(weights_path)
    expected = prompt.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shapes = [f"{k}: saved {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(
            f"{weights_path} does not match its config ({cls.__name__}): missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {bad_shapes}"
        )
    prompt.load_state_dict(state, strict=True)
    if model is not None:
        prompt.check_compatible(model)
    if device is not None or dtype is not None:
        prompt.to(device=device, dtype=dtype)
    return prompt
