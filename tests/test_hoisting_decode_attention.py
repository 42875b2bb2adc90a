"""The decode-step path of a shared prefix on the CPU (fastprompt/ops/prefix_attention_torch/decode.py): equals the float64
reference over [prefix; sequence], steps aside (returns None) for every call outside its narrow case, and is what a
hoisted generate() step runs."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import make_inputs, tiny_peft_pair

from fastprompt import reference
from fastprompt.ops import shared_prefix_decode

B, HQ, HKV, D, P = 3, 6, 2, 12, 5


def _inputs(lk, dtype=torch.float32, seed=0, transformers_layout=True):
    g = torch.Generator().manual_seed(seed)
    if transformers_layout:  # q as transformers hands it over: [B, 1, Hq, D] memory viewed [B, Hq, 1, D]
        q = torch.randn(B, 1, HQ, D, generator=g, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, HQ, 1, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, HKV, lk, D, generator=g, dtype=dtype) for _ in range(2))
    pk, pv = (torch.randn(HKV, P, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v, pk, pv


def _reference(q, k, v, pk, pv, mask, scale):
    return reference.prefix_attention(q.double(), k.double(), v.double(), pk.double(), pv.double(),
                                      key_padding_mask=mask, causal=True, scale=scale)


@pytest.mark.parametrize("lk", [1, 7])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transformers_layout", [True, False])
def test_equals_the_reference(lk, padded, dtype, transformers_layout):
    q, k, v, pk, pv = _inputs(lk, dtype, transformers_layout=transformers_layout)
    mask = None
    if padded:
        mask = torch.ones(B, lk, dtype=torch.bool)
        mask[0, : lk // 2] = False  # left padding on one row (its last key stays real)
        mask[2, -1] = lk == 1  # and a hole elsewhere (lk = 1: every row keeps its one key)
    scale = 0.37
    with torch.no_grad():
        out = shared_prefix_decode(q, k, v, pk, pv, mask, scale)
    assert out is not None and out.shape == (B, HQ, 1, D) and out.dtype == dtype
    ref = _reference(q, k, v, pk, pv, mask, scale)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    # contiguous as [B, 1, Hq, D]: what transformers' attention reshapes into hidden states without a copy
    assert out.transpose(1, 2).is_contiguous()


def test_all_true_mask_and_wide_window_take_the_path():
    q, k, v, pk, pv = _inputs(4)
    ref = _reference(q, k, v, pk, pv, None, 0.5)
    for mask, window in ((torch.ones(B, 4, dtype=torch.bool), None), (None, 4), (None, 100)):
        out = shared_prefix_decode(q, k, v, pk, pv, mask, 0.5, window=window)
        assert out is not None
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_steps_aside_outside_its_case():
    q, k, v, pk, pv = _inputs(4)
    call = dict(key_padding_mask=None, scale=0.5)
    assert shared_prefix_decode(q, k, v, pk, pv, **call) is not None
    empty_row = torch.ones(B, 4, dtype=torch.bool)
    empty_row[1] = False
    q2 = torch.randn(B, HQ, 2, D)
    cases = {
        "two queries per row": (q2, k, v, pk, pv, call),
        "softcap": (q, k, v, pk, pv, dict(call, softcap=30.0)),
        "a window hiding keys": (q, k, v, pk, pv, dict(call, window=3)),
        "dropout": (q, k, v, pk, pv, dict(call, dropout_p=0.1)),
        "bf16": (q.bfloat16(), k.bfloat16(), v.bfloat16(), pk.bfloat16(), pv.bfloat16(), call),
        "per-sample prefix": (q, k, v, pk.expand(B, *pk.shape), pv.expand(B, *pv.shape), call),
        "no sequence key": (q, k[:, :, :0], v[:, :, :0], pk, pv, call),
        "a row with every key padded": (q, k, v, pk, pv, dict(call, key_padding_mask=empty_row)),
        "strided last dim": (q, k, v, torch.randn(HKV, P, 2 * D)[..., ::2], pv, call),
        "prefix dtype": (q, k, v, pk.double(), pv.double(), call),
    }
    for name, (a, b, c, d, e, kw) in cases.items():
        assert shared_prefix_decode(a, b, c, d, e, **kw) is None, name
    # gradients to form: the op (its autograd) runs; nothing requiring grad under no_grad is fine
    pk_grad = pk.clone().requires_grad_(True)
    assert shared_prefix_decode(q, k, v, pk_grad, pv, **call) is None
    with torch.no_grad():
        assert shared_prefix_decode(q, k, v, pk_grad, pv, **call) is not None
    # a dispatch mode watching (FLOP counting): the op runs, so its FLOP formula sees the call
    with torch.no_grad(), FlopCounterMode(display=False):
        assert shared_prefix_decode(q, k, v, pk, pv, **call) is None


def test_hoisted_greedy_generate_steps_take_the_decode_path(monkeypatch):
    import fastprompt.integrations.transformers_attention as attention
    import fastprompt.patching as fpp

    calls = []
    real = attention.shared_prefix_decode

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(attention, "shared_prefix_decode", spy)
    patched, oracle = tiny_peft_pair("llama", "prompt", "CAUSAL_LM", num_virtual_tokens=4)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    new = 4
    got = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=1)
    layers = patched.get_base_model().config.num_hidden_layers
    assert calls == [True] * (layers * (new - 1))  # every decoding step of every layer; prefill runs the op
    tokens, m = ids, mask
    for _ in range(new):  # the no-cache greedy oracle over the unhoisted model's full forward
        with torch.no_grad():
            last = oracle(input_ids=tokens, attention_mask=m, use_cache=False).logits[:, -1].float()
        last[:, 3] = float("-inf")  # EOS (3) is never chosen: min_new_tokens = max_new_tokens
        nxt = last.argmax(-1, keepdim=True)
        tokens, m = torch.cat([tokens, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(got, tokens)
