"""Encoder-decoder bench cases: T5-style prefix tuning, PEFT vs the same PEFT model patched.

- training step (forward + backward + AdamW step) on a summarization-shaped batch: source S, target T, prefix P;
- summarization-style greedy generation of T new tokens.
Shapes: the issue's reference B=8, source 256, target 64, P=20 on a small random T5 (v1.1-style gated-GELU);
"default" mode runs a smaller T5 on a shorter batch on the CPU; "smoke" shrinks everything for the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

from ..patching import patch_model
from .cases import Case, Side, patched_train_sides

__all__ = ["T5Shape", "seq2seq_train_case", "seq2seq_generate_case", "seq2seq_cases"]


@dataclass(frozen=True)
class T5Shape:
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    d_kv: int = 64
    d_ff: int = 512
    vocab: int = 1024

    def label(self) -> str:
        return f"t5 {self.layers}L d{self.d_model} h{self.heads}"


def _build_t5_peft(shape: T5Shape, plen: int, device, seed: int = 0):
    import peft  # optional dependency (the bench extra)

    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=shape.vocab, d_model=shape.d_model, d_kv=shape.d_kv, d_ff=shape.d_ff,
                                   num_layers=shape.layers, num_decoder_layers=shape.layers, num_heads=shape.heads,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base = transformers.T5ForConditionalGeneration(config).to(device)
    base.set_attn_implementation("sdpa")
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=plen))
    return model


def _batch(shape: T5Shape, batch: int, source: int, target: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, shape.vocab, (batch, source), generator=g).to(device)
    labels = torch.randint(2, shape.vocab, (batch, target), generator=g).to(device)
    mask = torch.ones(batch, source, dtype=torch.long, device=device)
    mask[1:, -source // 4:] = 0  # summarization batches are padded
    return ids.masked_fill(mask == 0, 0), mask, labels


def seq2seq_train_case(shape: T5Shape, batch: int, source: int, target: int, plen: int, reps: int = 2) -> Case:
    def build(device):
        ids, mask, labels = _batch(shape, batch, source, target, device)
        return patched_train_sides(lambda: _build_t5_peft(shape, plen, device),
                                   dict(input_ids=ids, attention_mask=mask, labels=labels))

    params = dict(model=shape.label(), B=batch, S=source, T=target, P=plen)
    return Case("train step", "T5 prefix tuning (seq2seq)", params, build, "peft", 2e-3, reps)


def seq2seq_generate_case(shape: T5Shape, batch: int, source: int, new_tokens: int, plen: int,
                          reps: int = 2) -> Case:
    def build(device):
        ids, mask, _ = _batch(shape, batch, source, 1, device)
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)
        peft_model = _build_t5_peft(shape, plen, device).eval()
        fp_model = _build_t5_peft(shape, plen, device).eval()
        patch_model(fp_model)

        def peft_step():
            with torch.no_grad():
                return peft_model.generate(input_ids=ids, attention_mask=mask, **gen)

        def fp_step():
            with torch.no_grad():
                return fp_model.generate(input_ids=ids, attention_mask=mask, **gen)

        keep = list(peft_model.parameters()) + list(fp_model.parameters())
        return {"fastprompt": Side(fp_step, lambda: {"tokens": fp_step()}, keep),
                "baseline": Side(peft_step, lambda: {"tokens": peft_step()}, keep)}

    params = dict(model=shape.label(), B=batch, S=source, new=new_tokens, P=plen)
    return Case("generate", "T5 prefix tuning, summarization (seq2seq)", params, build, "peft", 0.0, reps)


def seq2seq_cases(mode: str = "default", gpu: bool = False) -> list:
    """The encoder-decoder rows of `fastprompt bench` (registered by bench.cases.suite)."""
    if mode == "smoke":
        tiny = T5Shape(layers=2, d_model=32, heads=4, d_kv=8, d_ff=64, vocab=128)
        return [seq2seq_train_case(tiny, 2, 16, 8, 4, reps=1)]  # the generate row runs from "quick" up
    if mode == "full" or gpu:  # the reference shape
        shape, batch, source, target = T5Shape(), 8, 256, 64
    elif mode == "default":  # the reference shape takes minutes per row on a 2-core CPU
        shape, batch, source, target = T5Shape(layers=2, d_model=128, heads=4, d_kv=32, d_ff=256, vocab=512), 4, 128, 32
    else:
        shape, batch, source, target = T5Shape(layers=2, d_model=64, heads=4, d_kv=16, d_ff=128, vocab=256), 2, 64, 16
    # turns (interleaved): a short step gets more, so its median holds on a loaded machine
    train_reps, generate_reps = (3, 3) if mode == "full" else (7, 4) if mode == "default" else (3, 2)
    return [seq2seq_train_case(shape, batch, source, target, 20, reps=train_reps),
            seq2seq_generate_case(shape, batch, source, target, 20, reps=generate_reps)]
