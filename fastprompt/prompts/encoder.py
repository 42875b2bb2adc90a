"""The learned prompt encoder E(x) of prompt pools and multi-task selectors (the seed's E(x) = f(W·x + b)).

The integration hands a pool / selector the frozen model's features of the input, q(x) `[B, hidden]` (a no-grad
pass without prompts, see fastprompt.integrations.query_pass). E maps them to the vector that selects prompts,
E(q) `[B, hidden]`, and is trained with the pool (its gradient comes from the selection scores):

- ``encoder=None``: E is the identity (the frozen features select directly, as L2P does).
- ``encoder="linear"``: E(q) = f(W·q + b); W starts as the identity and b at 0, so training starts from the
  frozen-feature selection. f is ``encoder_activation`` ("none", "relu", "gelu", "tanh").
- ``encoder="mlp"``: E(q) = q + W₂·f(W₁·q + b₁) + b₂ with ``encoder_hidden_size`` units; W₂, b₂ start at 0 (same
  start as "linear", a residual MLP).
- ``encoder=<an nn.Module>``: any module mapping `[B, hidden]` to `[B, hidden]`. Its state_dict is saved with the
  prompt; loading needs the module again: ``load_prompt(path, encoder=MyEncoder())`` (an instance, or a class /
  factory called with no arguments), and says so when it is missing.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

ENCODERS = (None, "linear", "mlp", "custom")
ACTIVATIONS = ("none", "relu", "gelu", "tanh")

__all__ = ["ENCODERS", "ACTIVATIONS", "LinearQueryEncoder", "MLPQueryEncoder", "build_encoder", "split_encoder_arg",
           "check_encoder_config", "resolve_custom_encoder"]


def _activation(name: str) -> nn.Module:
    return {"none": nn.Identity(), "relu": nn.ReLU(), "gelu": nn.GELU(), "tanh": nn.Tanh()}[name]


class LinearQueryEncoder(nn.Module):
    """E(q) = f(W·q + b), W = I and b = 0 at the start."""

    def __init__(self, width: int, activation: str = "none"):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.activation = _activation(activation)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(width))
            self.linear.bias.zero_()

    def forward(self, query: Tensor) -> Tensor:
        return self.activation(self.linear(query))


class MLPQueryEncoder(nn.Module):
    """E(q) = q + W₂·f(W₁·q + b₁) + b₂, W₂ = 0 and b₂ = 0 at the start (W₁ random: the residual branch can learn)."""

    def __init__(self, width: int, hidden: int, activation: str = "relu", seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed + 7)
        self.up = nn.Linear(width, hidden)
        self.activation = _activation(activation)
        self.down = nn.Linear(hidden, width)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(hidden, width, generator=g) / width**0.5)
            self.up.bias.zero_()
            self.down.weight.zero_()
            self.down.bias.zero_()

    def forward(self, query: Tensor) -> Tensor:
        return query + self.down(self.activation(self.up(query)))


def check_encoder_config(config) -> None:
    """Validate the encoder fields shared by PromptPoolConfig and MultiTaskPromptConfig."""
    if config.encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS} or an nn.Module, got {config.encoder!r}")
    if config.encoder_activation not in ACTIVATIONS:
        raise ValueError(f"encoder_activation must be one of {ACTIVATIONS}, got {config.encoder_activation!r}")
    if config.encoder_hidden_size < 0:
        raise ValueError(f"encoder_hidden_size must be >= 0 (0 = hidden_size), got {config.encoder_hidden_size}")
    if config.query_layer is not None:
        layer = config.query_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= config.num_layers:
            raise ValueError(
                f"query_layer must be an int in [0, num_layers={config.num_layers}] (the hidden state entering that "
                f"layer; num_layers = the last layer's output) or None, got {layer!r}")
        if config.query == "embeddings":
            raise ValueError("query_layer does not apply to query='embeddings' (that query runs no layer)")


def split_encoder_arg(kwargs: Dict[str, Any]) -> Optional[nn.Module]:
    """A user module passed as ``encoder=`` is taken out of the config kwargs (the config records "custom")."""
    encoder = kwargs.get("encoder")
    if isinstance(encoder, nn.Module):
        kwargs["encoder"] = "custom"
        kwargs.setdefault("encoder_class", f"{type(encoder).__module__}.{type(encoder).__qualname__}")
        return encoder
    if encoder == "custom":
        raise ValueError("encoder='custom' needs the module itself: pass encoder=<nn.Module>")
    return None


def resolve_custom_encoder(encoder, saved_class: str) -> nn.Module:
    """The module to load a saved custom encoder into: an instance, or a class / factory called with no args."""
    if encoder is None:
        raise ValueError(
            f"this prompt was saved with a custom encoder ({saved_class or 'an nn.Module'}); its weights are in the "
            "safetensors file but its code is not: pass the module to load it into, "
            "load_prompt(path, encoder=MyEncoder()) (an instance, or a class / factory taking no arguments)")
    if not isinstance(encoder, nn.Module):
        if not callable(encoder):
            raise TypeError(f"encoder must be an nn.Module, or a class / factory returning one; got {encoder!r}")
        encoder = encoder()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"the encoder factory returned {type(encoder).__name__}, not an nn.Module")
    return encoder


def build_encoder(config, custom: Optional[nn.Module]) -> Optional[nn.Module]:
    """The E(x) module named by `config` (None for the identity)."""
    if config.encoder is None:
        return None
    if config.encoder == "custom":
        if custom is None:
            raise ValueError("encoder='custom' needs the module itself: pass encoder=<nn.Module>")
        return custom
    width = config.hidden_size
    if config.encoder == "linear":
        return LinearQueryEncoder(width, config.encoder_activation)
    hidden = config.encoder_hidden_size or width
    activation = "relu" if config.encoder_activation == "none" else config.encoder_activation
    return MLPQueryEncoder(width, hidden, activation, seed=getattr(config, "seed", 0))


def encode_query(encoder: Optional[nn.Module], query: Tensor, width: int) -> Tensor:
    """E(q), checked: a custom module must keep the [B, width] shape the pool keys / selectors expect."""
    if encoder is None:
        return query
    param = next(encoder.parameters(), None)
    if param is not None and param.dtype != query.dtype and param.dtype.is_floating_point:
        query = query.to(param.dtype)
    out = encoder(query)
    if not isinstance(out, Tensor) or out.shape != query.shape:
        raise ValueError(
            f"the prompt encoder must map the query [B, {width}] to [B, {width}]; {type(encoder).__name__} returned "
            f"{tuple(getattr(out, 'shape', ())) if isinstance(out, Tensor) else type(out).__name__}")
    return out
