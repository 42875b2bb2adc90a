"""Bad input to prefix_attention gets an error naming the argument and what was expected."""
import pytest
import torch

import fastprompt as fp


def _inputs(b=2, hq=4, hkv=2, lq=3, lk=5, d=8, p=2):
    return dict(q=torch.randn(b, hq, lq, d), k=torch.randn(b, hkv, lk, d), v=torch.randn(b, hkv, lk, d),
                prefix_k=torch.randn(hkv, p, d), prefix_v=torch.randn(hkv, p, d))


def _call(**changes):
    inputs = _inputs()
    kwargs = {}
    for key, value in changes.items():
        if key in inputs:
            inputs[key] = value
        else:
            kwargs[key] = value
    return fp.ops.prefix_attention(inputs.pop("q"), inputs.pop("k"), inputs.pop("v"), inputs.pop("prefix_k"),
                                   inputs.pop("prefix_v"), **kwargs)


@pytest.mark.parametrize("changes, error, words", [
    (dict(q=torch.randn(2, 4, 8)), ValueError, "`q` must be 4-D"),
    (dict(q=[1.0]), TypeError, "`q` must be a torch.Tensor"),
    (dict(q=torch.randint(0, 3, (2, 4, 3, 8))), TypeError, "`q` must be float16"),
    (dict(k=torch.randn(3, 2, 5, 8)), ValueError, "`k` must be [B=2"),
    (dict(k=torch.randn(2, 2, 5, 4)), ValueError, "`k` must be [B=2, Hkv, Lk, D=8]"),
    (dict(v=torch.randn(2, 2, 6, 8)), ValueError, "`v` must have the shape of k"),
    (dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)), ValueError, "must be a multiple"),
    (dict(k=torch.randn(2, 2, 5, 8, dtype=torch.float64)), TypeError, "`k` must have q's dtype"),
    (dict(prefix_k=torch.randn(2, 8)), ValueError, "`prefix_k` must be [Hkv, P, D]"),
    (dict(prefix_k=torch.randn(3, 2, 8), prefix_v=torch.randn(3, 2, 8)), ValueError, "[Hkv=2, P, D=8]"),
    (dict(prefix_v=torch.randn(2, 3, 8)), ValueError, "`prefix_v` must have the shape of prefix_k"),
    (dict(prefix_v=None), ValueError, "`prefix_v` is None"),
    (dict(prefix_k=torch.randn(2, 0, 8), prefix_v=torch.randn(2, 0, 8)), ValueError, "P = 0"),
    (dict(prefix_k=torch.randn(5, 2, 2, 8), prefix_v=torch.randn(5, 2, 2, 8)), ValueError, "per sample and must be [B=2"),
    (dict(prefix_index=torch.tensor([0, 1])), ValueError, "must be a pool [N, Hkv, P, D]"),
    (dict(prefix_k=torch.randn(4, 2, 2, 8), prefix_v=torch.randn(4, 2, 2, 8), prefix_index=torch.tensor([0, 4])),
     ValueError, "entries must be in [-1, N=4)"),
    (dict(prefix_k=torch.randn(4, 2, 2, 8), prefix_v=torch.randn(4, 2, 2, 8), prefix_index=torch.tensor([[0, -2]] * 2)),
     ValueError, "entries must be in [-1, N=4)"),
    (dict(prefix_k=torch.randn(4, 2, 2, 8), prefix_v=torch.randn(4, 2, 2, 8), prefix_index=torch.tensor([0.0, 1.0])),
     TypeError, "`prefix_index` must be an integer tensor"),
    (dict(prefix_k=torch.randn(4, 2, 2, 8), prefix_v=torch.randn(4, 2, 2, 8), prefix_index=torch.tensor([0, 1, 2])),
     ValueError, "`prefix_index` must be [B=2]"),
    (dict(prefix_k=None, prefix_v=None, prefix_index=torch.tensor([0, 1])), ValueError, "`prefix_index` was given"),
    (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "`key_padding_mask` must be [B=2, Lk=5]"),
    (dict(key_padding_mask=torch.ones(2, 5)), TypeError, "`key_padding_mask` must be bool"),
    (dict(scale=-1.0), ValueError, "`scale` must be a positive"),
    (dict(softcap=-2.0), ValueError, "`softcap` must be a positive"),
    (dict(window=0), ValueError, "`window` must be a positive int"),
    (dict(window=2.5), ValueError, "`window` must be a positive int"),
    (dict(causal="yes"), TypeError, "`causal` must be a bool"),
    (dict(backend="fast"), ValueError, "`backend` must be one of"),
    (dict(backend=3), TypeError, "`backend` must be a string"),
])
def test_bad_input_names_the_argument(changes, error, words):
    with pytest.raises(error) as info:
        _call(**changes)
    assert words in str(info.value)


def test_integer_padding_mask_is_accepted_as_bool():
    inputs = _inputs()
    mask = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    out_int = fp.ops.prefix_attention(*inputs.values(), key_padding_mask=mask)
    out_bool = fp.ops.prefix_attention(*inputs.values(), key_padding_mask=mask.bool())
    torch.testing.assert_close(out_int, out_bool)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((ValueError, ImportError)) as info:
        _call(backend="triton")
    assert "triton" in str(info.value).lower()


def test_cuda_backend_on_cpu_tensors_is_refused():
    with pytest.raises((ValueError, ImportError)) as info:
        _call(backend="cuda")
    assert "cuda" in str(info.value).lower()


def test_ops_namespace_binds_functions_not_modules():
    import fastprompt.ops.gather_prompts  # noqa: F401 - importing the submodule must not shadow the function
    import fastprompt.prompts  # noqa: F401

    for name in ("prefix_attention", "gather_prompts", "mix_prompts"):
        assert callable(getattr(fp.ops, name)), name


# --- one rule for every backend (issue 10, item 7) -------------------------------------------------------------
ALL_BACKENDS = ["auto", "torch", "triton", "reference"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("q_dtype, prefix_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                                   (torch.float32, torch.float16)])
def test_prefix_dtype_other_than_q_is_refused_by_every_backend(backend, q_dtype, prefix_dtype):
    inputs = {n: t.to(q_dtype) for n, t in _inputs().items()}
    inputs["prefix_k"], inputs["prefix_v"] = inputs["prefix_k"].to(prefix_dtype), inputs["prefix_v"].to(prefix_dtype)
    with pytest.raises(TypeError) as info:
        fp.ops.prefix_attention(*inputs.values(), backend=backend)
    assert "`prefix_k` must have q's dtype" in str(info.value) and str(q_dtype) in str(info.value)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name, value", [("softcap", float("inf")), ("softcap", float("nan")), ("softcap", 0.0 - 1),
                                         ("scale", float("inf")), ("scale", float("nan")), ("scale", 0.0),
                                         ("scale", -0.5), ("scale", float("-inf"))])
def test_non_finite_or_non_positive_scale_and_softcap_are_refused(backend, name, value):
    with pytest.raises(ValueError) as info:
        _call(backend=backend, **{name: value})
    assert f"`{name}` must be a positive finite float" in str(info.value)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8, torch.int64])
def test_every_backend_takes_any_integer_prefix_index(backend, dtype):
    inputs = _inputs()
    pool_k, pool_v = torch.randn(4, 2, 2, 8), torch.randn(4, 2, 2, 8)
    index = torch.tensor([[3, -1 if dtype != torch.uint8 else 0], [1, 1]])
    args = (inputs["q"], inputs["k"], inputs["v"], pool_k, pool_v)
    out = fp.ops.prefix_attention(*args, prefix_index=index.to(dtype), backend=backend)
    expected = fp.reference.prefix_attention(*args, prefix_index=index)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_keys_in_bshd_layout_get_a_transpose_hint():
    q = torch.randn(2, 8, 5, 16)
    k = v = torch.randn(2, 5, 16, 16)  # [B, L, H, D] by mistake: 16 "heads" of k for 8 query heads
    with pytest.raises(ValueError) as info:
        fp.ops.prefix_attention(q, k, v)
    message = str(info.value)
    assert "must be a multiple" in message and "[B, L, H, D]" in message and "transpose(1, 2)" in message


def test_an_explicit_backend_that_cannot_run_the_call_lists_every_backends_reasons():
    inputs = {k: v.double() for k, v in _inputs().items()}
    with pytest.raises(ValueError) as info:
        fp.ops.prefix_attention(*inputs.values(), attn_bias=torch.randn(1, 4, 3, 5), dropout_p=0.1, backend="cuda")
    message = str(info.value)
    assert message.startswith("prefix_attention: backend='cuda' cannot run this call: ")
    for words in ("CUDA kernels take float16 or bfloat16 inputs, got torch.float64",
                  "the CUDA kernels take no attn_bias / prefix_bias", "the CUDA kernels have no attention dropout",
                  "\n  triton: ", "triton kernels take float16, bfloat16 or float32 inputs, got torch.float64",
                  "\n  torch: can run it", "\n  reference: can run it"):
        assert words in message, words


def test_auto_with_no_backend_left_lists_every_backends_reasons(monkeypatch):
    from fastprompt.ops.prefix_attention_torch import TorchBackend

    monkeypatch.setattr(TorchBackend, "SUPPORTS_SOFTCAP", False)  # a capability the CPU's only auto choice lacks
    with pytest.raises(ValueError, match=r"no backend can run this call on cpu:(.|\n)*torch: the torch ops have no "
                                         r"softcap"):
        _call(softcap=30.0)
    assert _call().shape == (2, 4, 3, 8)  # what it does declare still runs


def test_gather_mix_explicit_backend_that_cannot_run_lists_every_backends_reasons():
    pool = torch.randn(4, 3)
    with pytest.raises(RuntimeError) as info:
        fp.ops.gather_prompts(pool, torch.tensor([0]), backend="cuda")
    message = str(info.value)
    assert "backend='cuda' cannot run this call: the CUDA kernels need CUDA tensors, got cpu" in message
    assert "\n  torch: can run it" in message and "\n  reference: can run it" in message
