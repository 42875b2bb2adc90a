"""Tiny encoder-decoder models (T5, T5 v1.1 gated-GELU, mT5, BART) and inputs for the seq2seq tests."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

VOCAB = 97
SEQ2SEQ_FAMILIES = ["t5", "t5v11", "mt5", "bart"]


def tiny_seq2seq_config(family: str):
    if family in ("t5", "t5v11", "mt5"):
        cls = transformers.MT5Config if family == "mt5" else transformers.T5Config
        # small bucket counts so that prefix keys and long distances land in the logarithmic buckets too
        return cls(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="relu" if family == "t5" else "gated-gelu",
                   tie_word_embeddings=family == "t5", dropout_rate=0.0, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    if family == "bart":
        return transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                       decoder_ffn_dim=64, max_position_embeddings=128, dropout=0.0,
                                       attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
                                       bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                                       forced_eos_token_id=None)
    raise KeyError(family)


def pad_id(family: str) -> int:
    return 1 if family == "bart" else 0


def tiny_seq2seq(family: str, seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    cfg = tiny_seq2seq_config(family)
    cls = transformers.MT5ForConditionalGeneration if family == "mt5" else transformers.AutoModelForSeq2SeqLM
    if family == "mt5":
        model = cls(cfg)
        model.set_attn_implementation(attn)
    else:
        model = cls.from_config(cfg, attn_implementation=attn)
    return model.float().eval()


def peft_seq2seq_pair(family: str, peft_config, seed: int = 0):
    """Two identical PEFT seq2seq models with randomized prompt parameters: patch one, keep one as the oracle."""
    import peft

    base = tiny_seq2seq(family, seed)
    base2 = copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    try:
        m1 = peft.get_peft_model(base, copy.deepcopy(peft_config))
    except AttributeError as err:  # e.g. peft 0.20 on transformers 5.20: PEFT itself cannot wrap the model
        import transformers

        pytest.skip(f"peft {peft.__version__} cannot build a SEQ_2_SEQ_LM model on transformers "
                    f"{transformers.__version__} ({err}); nothing to compare with")
    m2 = peft.get_peft_model(base2, copy.deepcopy(peft_config))
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in m1.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    m2.load_state_dict(m1.state_dict())
    return m1.eval(), m2.eval()


def seq2seq_inputs(family: str, batch: int = 3, src: int = 7, tgt: int = 5, seed: int = 0):
    """Encoder ids/mask with left, right padding and a hole; labels with -100; decoder mask with right padding."""
    gen = torch.Generator().manual_seed(seed)
    pad = pad_id(family)
    ids = torch.randint(3, VOCAB, (batch, src), generator=gen)
    mask = torch.ones(batch, src, dtype=torch.long)
    mask[1, -2:] = 0
    mask[2, :2] = 0
    mask[0, 3] = 0
    ids = ids.masked_fill(mask == 0, pad)
    labels = torch.randint(3, VOCAB, (batch, tgt), generator=gen)
    labels[1, -2:] = -100
    labels[2, -1] = -100
    decoder_mask = (labels != -100).long()
    return ids, mask, labels, decoder_mask


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def prompt_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _seq2seq_supported() -> bool:
    from fastprompt._versions import release
    from fastprompt.integrations.seq2seq import MIN_SEQ2SEQ_TRANSFORMERS

    return release(transformers.__version__)[:2] >= MIN_SEQ2SEQ_TRANSFORMERS


# Encoder-decoder prompt learning is claimed from transformers 5.24 on; below, patch_model refuses it (tested in
# tests/test_seq2seq_peft.py::test_seq2seq_refused_on_older_transformers).
requires_seq2seq_transformers = pytest.mark.skipif(
    not _seq2seq_supported(), reason=f"encoder-decoder prompt learning needs a newer transformers than "
                                     f"{transformers.__version__} (refused there, see fastprompt.integrations.seq2seq)")
