"""Tiny Vision Transformers (ViT, DeiT, DINOv2) and the oracle of the vision prompt tests.

The oracle is the reference implementations' semantics written out eagerly (l2p-pytorch, dualprompt-pytorch,
CODA-Prompt): a float64 twin of the model whose attention concatenates each layer's per-row prefix K/V before the
sequence keys and takes a plain softmax (`torch.cat([key_prefix, k], dim=2); attn = (q @ k^T * scale).softmax(-1)`),
and whose embeddings output gets the per-row input-level prompts inserted after the leading tokens ([CLS], DeiT's
distillation token). Nothing of fastprompt runs in it; the tests build the per-row prompts from the prompt's
parameters by hand.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ORACLE_ATTENTION = "fastprompt_test_vision_concat"
LEADING_TOKENS = {"vit": 1, "deit": 2, "dinov2": 1, "clip_vision_model": 1, "siglip_vision_model": 0}
# where the frozen model's pre-logits are: [CLS] of the last hidden state, or the pooler output (CLIP:
# post_layernorm([CLS]); SigLIP: the attention-pooling head)
POOLED_QUERY = {"clip_vision_model", "siglip_vision_model"}

# What the oracle twin reads during one call: {layer: (K [B, H, P, D], V)} and the input-level prompts [B, P, d].
ORACLE = {"prefixes": {}, "inputs": None}

# (name, family, head): head "cls" = ForImageClassification (logits, loss from labels), "features" = the bare model
MODELS = [("vit-cls", "vit", "cls"), ("deit-cls", "deit", "cls"), ("dinov2-cls", "dinov2", "cls"),
          ("vit-features", "vit", "features"), ("dinov2-features", "dinov2", "features"),
          ("clip-vision", "clip", "features"), ("siglip-vision", "siglip", "features")]
NUM_LABELS = 5


def tiny_config(family: str):
    common = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=48, num_labels=NUM_LABELS)
    if family == "vit":
        return transformers.ViTConfig(**common)
    if family == "deit":
        return transformers.DeiTConfig(**common)
    if family == "dinov2":
        return transformers.Dinov2Config(**common, layerscale_value=0.5)
    if family == "clip":
        return transformers.CLIPVisionConfig(**common)
    if family == "siglip":
        return transformers.SiglipVisionConfig(**common)
    raise KeyError(family)


def tiny_vision_model(family: str, head: str = "cls", seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    config = tiny_config(family)
    config.num_hidden_layers = layers
    classes = {
        ("vit", "cls"): transformers.ViTForImageClassification, ("vit", "features"): transformers.ViTModel,
        ("deit", "cls"): transformers.DeiTForImageClassification, ("deit", "features"): transformers.DeiTModel,
        ("dinov2", "cls"): transformers.Dinov2ForImageClassification,
        ("dinov2", "features"): transformers.Dinov2Model,
        ("clip", "features"): transformers.CLIPVisionModel, ("siglip", "features"): transformers.SiglipVisionModel,
    }
    model = classes[(family, head)](config).eval()
    with torch.no_grad():  # cls tokens / position embeddings away from their near-zero init
        for name, p in model.named_parameters():
            if any(k in name for k in ("cls_token", "distillation_token", "position_embedding", "class_embedding")):
                p.normal_(0.0, 0.5)
    return model


def pixels(batch: int = 3, seed: int = 0):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _layers(model):
    base = model.base_model
    if hasattr(base, "layers"):
        return base.layers
    return base.encoder.layers if hasattr(base.encoder, "layers") else base.encoder.layer


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    assert attention_mask is None, "the tiny vision tests pass no attention mask"
    prefix = ORACLE["prefixes"].get(getattr(module, "_oracle_layer", None))
    if prefix is not None:
        key = torch.cat([prefix[0].to(key.dtype), key], dim=2)
        value = torch.cat([prefix[1].to(value.dtype), value], dim=2)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    attn = (query @ key.transpose(-2, -1) * scale).softmax(dim=-1)
    return (attn @ value).transpose(1, 2).contiguous(), attn


def _insert_inputs(module, args, output):
    prompts = ORACLE["inputs"]
    if prompts is None:
        return None
    lead = module._oracle_lead
    return torch.cat([output[:, :lead], prompts.to(output.dtype), output[:, lead:]], dim=1)


_registered = False


def oracle_twin(model):
    """A float64, unpatched copy of `model` that runs the oracle semantics above."""
    global _registered
    if not _registered:
        AttentionInterface.register(ORACLE_ATTENTION, _oracle_attention)
        AttentionMaskInterface.register(ORACLE_ATTENTION, eager_mask)
        _registered = True
    twin = copy.deepcopy(model).double()
    twin.set_attn_implementation(ORACLE_ATTENTION)
    for idx, layer in enumerate(_layers(twin)):
        (layer.attention if hasattr(layer, "attention") else layer.self_attn)._oracle_layer = idx
    emb = twin.base_model.embeddings
    emb._oracle_lead = LEADING_TOKENS[model.config.model_type]
    emb.register_forward_hook(_insert_inputs)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def oracle_query(twin, x, mode: str = "cls"):
    """The frozen model's [CLS] pre-logits (final layer norm at [CLS]) without prompts."""
    ORACLE["prefixes"], ORACLE["inputs"] = {}, None
    with torch.no_grad():
        out = twin.base_model(pixel_values=x.double())
    if mode != "cls":
        return out.last_hidden_state.mean(dim=1)
    return out.pooler_output if twin.config.model_type in POOLED_QUERY else out.last_hidden_state[:, 0]


def run_oracle(twin, x, labels=None, prefixes=None, inputs=None):
    ORACLE["prefixes"], ORACLE["inputs"] = dict(prefixes or {}), inputs
    try:
        kwargs = {"labels": labels} if labels is not None else {}
        return twin(pixel_values=x.double(), **kwargs)
    finally:
        ORACLE["prefixes"], ORACLE["inputs"] = {}, None


def readout(out, head: str, labels=None, weights=None):
    """(what the model returns, a scalar loss of it): logits + the model's loss, or features + a distance to
    fixed targets `weights`."""
    if head == "cls":
        return out.logits, out.loss
    hidden = out.last_hidden_state
    # squared distances to fixed targets: positive terms (a relative error of the loss means something)
    return hidden, ((hidden - weights.to(hidden.dtype)) ** 2).mean() + (out.pooler_output ** 2).mean()


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def grads_rel(got: dict, want: dict) -> float:
    """max over parameters of ||g - g_ref|| / ||all of g_ref||: relative to the scale of the whole gradient."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    total = torch.sqrt(sum((w.double() ** 2).sum() for w in want.values()))
    return max(float((got[n].double() - want[n].double()).norm() / total) for n in want)


def grads_of(named) -> dict:
    """name -> gradient of each (name, parameter), zeros where no gradient reached it."""
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in named}


def assert_grads_match(prompt, oracle_params: dict, tol: float = 1e-4, what=None) -> tuple:
    """Every prompt parameter's gradient equals the oracle copy's, relative to the whole gradient's scale
    (grads_rel); returns (mine, theirs)."""
    mine, theirs = grads_of(prompt.named_parameters()), grads_of(oracle_params.items())
    assert grads_rel(mine, theirs) < tol, what
    return mine, theirs


def cos_rows(q, keys, attention=None):
    """[B, N] cosine similarities, row by row (attention: CODA's cos(q * A_n, K_n))."""
    rows = []
    for b in range(q.shape[0]):
        qa = [q[b] * attention[n] if attention is not None else q[b] for n in range(keys.shape[0])]
        rows.append(torch.stack([F.cosine_similarity(qa[n], keys[n], dim=0) for n in range(keys.shape[0])]))
    return torch.stack(rows)


def assert_threads_match_serial(call, batches, repeats: int = 5) -> None:
    """`call(x)` from 4 threads at once, each on its own batch, `repeats` times: every thread gets exactly what a
    serial call gives (prompts, queries and prefixes travel with the call, never as state on the shared model)."""
    import threading

    with torch.no_grad():
        serial = [call(x) for x in batches]
    results = {}

    def run(i):
        with torch.no_grad():
            for _ in range(repeats):
                results[i] = call(batches[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(serial):
        assert torch.equal(results[i], want), i
