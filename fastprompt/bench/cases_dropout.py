"""P-tuning v2 on a BERT-family encoder in `train()` mode, attention dropout on: the fused dropout against PEFT.

P-tuning v2 in PEFT is prefix tuning without the reparameterization (`prefix_projection=False`) on a sequence
classifier. The baseline is PEFT's path: its own forward where PEFT runs it, and where it refuses (PEFT 0.21.2 on
transformers >= 5.24 refuses prefix tuning on encoders: it looks for a `past_key_values` argument) its semantics
written out: `base(input_ids, attention_mask=[ones(P); mask], cache=get_prompt(B), labels=...)`, which builds the
same B-fold prefix cache, concatenated K/V and 4D mask. The timed step (forward, backward, AdamW) runs in train()
mode, so both sides draw attention dropout (different random streams: the outputs are not compared there); the
equality check runs the same models in eval() mode, without dropout.
"""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

from ..integrations.cache_compat import cache_kwarg
from ..patching import patch_model
from .cases import Case, Side, trainable_parameters

__all__ = ["encoder_dropout_case", "dropout_cases"]


def _bert(layers: int, hidden: int, heads: int, dropout: float, seed: int):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=512, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=512, num_labels=2,
                        attention_probs_dropout_prob=dropout, hidden_dropout_prob=dropout,
                        attn_implementation="sdpa")
    return BertForSequenceClassification(config)


def _ptuning_v2(layers, hidden, heads, dropout, plen, seed=0):
    import peft  # optional dependency (the bench extra)

    model = peft.get_peft_model(_bert(layers, hidden, heads, dropout, seed),
                                peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=plen,
                                                        prefix_projection=False))
    with torch.no_grad():  # sized like real K/V, so the outputs depend on the prefix
        emb = model.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return model


def _peft_forward(model):
    """PEFT's own forward, or its semantics written out where this PEFT refuses the model."""
    def written_out(ids, mask, labels):
        batch, plen = ids.shape[0], model.active_peft_config.num_virtual_tokens
        base = model.get_base_model()
        full_mask = torch.cat([mask.new_ones(batch, plen), mask], dim=1)
        return base(input_ids=ids, attention_mask=full_mask, labels=labels,
                    **{cache_kwarg(base.forward): model.get_prompt(batch)})

    def forward(ids, mask, labels):
        try:
            return model(input_ids=ids, attention_mask=mask, labels=labels)
        except ValueError as err:
            if "past key values" not in str(err):
                raise
            return written_out(ids, mask, labels)

    return forward


def _side(model, forward, ids, mask, labels) -> Side:
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        model.train()  # attention dropout on
        forward(ids, mask, labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def check():
        model.eval()  # no dropout: both sides must give the same loss and prompt gradient
        try:
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            loss = forward(ids, mask, labels).loss
            grads = torch.autograd.grad(loss, [p for _, p in named])
        finally:
            model.train()
        return {"loss": loss.detach(), **{f"grad {n}": g for (n, _), g in zip(named, grads)}}

    return Side(step, check, list(model.parameters()) + list(model.buffers()))


def encoder_dropout_case(layers: int, hidden: int, heads: int, batch: int, seq: int, plen: int,
                         dropout: float = 0.1, reps: int = 3) -> Case:
    def build(device):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, 512, (batch, seq), generator=g).to(device)
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        mask[: batch // 2, seq - seq // 4:] = 0  # right padding on half of the rows
        labels = torch.randint(0, 2, (batch,), generator=g).to(device)
        sides = {}
        for name, patch in (("baseline", False), ("fastprompt", True)):
            model = _ptuning_v2(layers, hidden, heads, dropout, plen).to(device)
            if patch:
                patch_model(model)
            forward = (lambda ids, mask, labels, model=model: model(input_ids=ids, attention_mask=mask,
                                                                      labels=labels)) if patch else _peft_forward(model)
            sides[name] = _side(model, forward, ids, mask, labels)
        return sides

    params = dict(model=f"bert L{layers} h{hidden} {heads}h", B=batch, S=seq, P=plen, dropout=dropout)
    return Case("train step", "P-tuning v2 (BERT, train mode, attention dropout)", params, build, "peft", 2e-3, reps)


def dropout_cases(mode: str = "default", gpu: bool = False) -> list:
    """The encoder-with-dropout rows of `fastprompt bench` (registered by bench.runner.suite)."""
    if mode == "smoke":
        return [encoder_dropout_case(2, 32, 4, 2, 16, 4, reps=1)]
    if mode == "full" or gpu:
        return [encoder_dropout_case(6, 384, 12, 8, 128, 20, reps=3)]  # MiniLM-sized
    if mode == "quick":
        return [encoder_dropout_case(2, 128, 4, 4, 64, 8, reps=2)]
    return [encoder_dropout_case(4, 256, 8, 8, 128, 20, reps=3)]
