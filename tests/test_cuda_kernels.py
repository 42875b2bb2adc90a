"""GPU tests of every CUDA kernel (and the Triton backend) against the float64 oracle, fastprompt.reference.

Error measure: ||out - ref|| / ||ref|| over the whole output, ref computed in float64 on the same inputs (the
fp16/bf16 inputs upcast). Covers decode and prefill shapes, both tile configurations, forced and automatic
split-KV, the three prefix modes (shared, per sample, pool with empty slots), GQA/MQA, padding with holes, causal,
sliding window, softcap, head dims 64/128/256, fp16/bf16; plus gather/mix forward and backward.
"""
import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"  # a module constant so the harness itself can be dry-run elsewhere
TOL = {torch.float16: 6e-3, torch.bfloat16: 2.5e-2, torch.float32: 1e-5}


def _cuda_backend():
    from fastprompt._cuda_build_info import extension, extension_error

    if extension() is None:
        pytest.fail(f"a CUDA GPU is present but fastprompt._C is unavailable: {extension_error()}")
    from fastprompt.ops.prefix_attention_cuda import CudaBackend

    return CudaBackend


def _args(q, k, v, kpm, norm, causal, scale, softcap, window):
    from fastprompt.ops.prefix_attention_inputs import PrefixAttentionArgs

    return PrefixAttentionArgs(q, k, v, norm["prefix_k"], norm["prefix_v"], norm["prefix_index"], norm["prefix_mode"],
                               kpm, causal, scale, softcap or 0.0, -1 if window is None else window)


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_case(B=2, Hq=8, Hkv=2, Lq=1, Lk=300, D=128, P=20, mode="shared", S=2, N=5, dtype=torch.bfloat16,
              padding=None, seed=0):
    """Inputs in both layouts: public (for the oracle / public op) and normalized (for backend modules)."""
    dev = DEVICE
    g = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    q, k, v = rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
    kpm = None
    if padding == "left":
        lens = torch.randint(1, Lk + 1, (B,), generator=g, device=dev)
        kpm = torch.arange(Lk, device=dev)[None, :] >= (Lk - lens)[:, None]
    elif padding == "holes":
        kpm = torch.rand(B, Lk, generator=g, device=dev) > 0.3
    elif padding == "empty_row":  # batch row 0 sees no sequence key at all
        kpm = torch.ones(B, Lk, dtype=torch.bool, device=dev)
        kpm[0] = False
    pub = dict(prefix_k=None, prefix_v=None, prefix_index=None)
    norm = dict(prefix_k=None, prefix_v=None, prefix_index=None, prefix_mode=0)
    if mode == "shared":
        pk, pv = rnd(Hkv, P, D), rnd(Hkv, P, D)
        pub = dict(prefix_k=pk, prefix_v=pv, prefix_index=None)
        norm = dict(prefix_k=pk[None], prefix_v=pv[None], prefix_index=torch.zeros(B, 1, dtype=torch.long, device=dev),
                    prefix_mode=1)
    elif mode == "per_sample":
        pk, pv = rnd(B, Hkv, P, D), rnd(B, Hkv, P, D)
        pub = dict(prefix_k=pk, prefix_v=pv, prefix_index=None)
        norm = dict(prefix_k=pk, prefix_v=pv, prefix_index=torch.arange(B, device=dev)[:, None], prefix_mode=2)
    elif mode == "pool":
        pk, pv = rnd(N, Hkv, P, D), rnd(N, Hkv, P, D)
        idx = torch.randint(-1, N, (B, S), generator=g, device=dev)
        idx[0, 0] = 1  # at least one live entry
        pub = dict(prefix_k=pk, prefix_v=pv, prefix_index=idx)
        norm = dict(prefix_k=pk, prefix_v=pv, prefix_index=idx, prefix_mode=3)
    return q, k, v, kpm, pub, norm


def oracle(q, k, v, kpm, pub, causal, scale, softcap, window):
    from fastprompt import reference

    d = lambda t: None if t is None else t.double()
    out, lse = reference.prefix_attention(d(q), d(k), d(v), d(pub["prefix_k"]), d(pub["prefix_v"]),
                                          prefix_index=pub["prefix_index"], key_padding_mask=kpm, causal=causal,
                                          scale=scale, softcap=softcap, window=window, return_lse=True)
    return out, lse


def check(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err = _rel(out, ref_out)
    assert err < TOL[dtype], f"relative error {err:.3e} >= {TOL[dtype]:.1e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse -inf pattern differs from the oracle"
    if finite.any():
        lerr = (lse.double()[finite] - ref_lse.double()[finite]).abs().max().item()
        assert lerr < 2e-2, f"lse max abs error {lerr:.3e}"
    empty = ~finite
    if empty.any():
        assert (out[empty] == 0).all(), "rows with no visible key must be zeros"


def run_backend(backend, q, k, v, kpm, norm, causal, scale, softcap, window, **kw):
    return backend.forward(_args(q, k, v, kpm, norm, causal, scale, softcap, window), **kw)[:2]


# ------------------------------------------------------------------ decode shapes (one-warp tiles, split-KV)

DECODE_CASES = [
    # (B, Hq, Hkv, Lq, Lk, P, mode, padding, causal, window, softcap)
    (1, 32, 8, 1, 4096, 100, "shared", None, True, None, None),
    (4, 8, 2, 1, 1000, 20, "per_sample", "left", True, None, None),
    (3, 8, 1, 1, 777, 37, "pool", "holes", True, None, None),
    (2, 4, 4, 1, 513, 1, "shared", None, True, 128, None),
    (2, 16, 2, 1, 300, 20, "pool", None, True, None, 30.0),
    (2, 8, 2, 4, 260, 17, "shared", "holes", True, 64, 50.0),
    (2, 8, 8, 3, 90, 20, "none", "empty_row", True, None, None),
    (2, 8, 2, 1, 1, 5, "pool", None, True, None, None),
    (2, 4, 2, 2, 200, 33, "per_sample", None, False, None, None),
    (2, 4, 2, 2, 200, 33, "none", None, False, 40, None),
]


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(str(x) for x in c))
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_decode_kernel_matches_oracle(case, D, dtype, num_splits):
    cuda = _cuda_backend()
    B, Hq, Hkv, Lq, Lk, P, mode, padding, causal, window, softcap = case
    q, k, v, kpm, pub, norm = make_case(B, Hq, Hkv, Lq, Lk, D, P, mode, S=3, dtype=dtype, padding=padding)
    scale = 1 / math.sqrt(D)
    ref_out, ref_lse = oracle(q, k, v, kpm, pub, causal, scale, softcap, window)
    out, lse = run_backend(cuda, q, k, v, kpm, norm, causal, scale, softcap, window, num_splits=num_splits,
                           force_config=0)
    check(out, lse, ref_out, ref_lse, dtype)


# ------------------------------------------------------------------ prefill / training shapes (four-warp tiles)

PREFILL_CASES = [
    # (B, Hq, Hkv, Lq, Lk, P, mode, padding, causal, window, softcap)
    (2, 8, 2, 128, 128, 20, "shared", None, True, None, None),
    (2, 4, 4, 200, 200, 30, "per_sample", "left", True, None, None),
    (3, 4, 2, 77, 77, 10, "pool", "holes", True, None, None),
    (1, 8, 1, 100, 300, 64, "shared", None, True, 50, None),  # chunked prefill: Lq < Lk
    (2, 4, 2, 96, 96, 16, "pool", None, False, None, 20.0),
    (2, 4, 2, 65, 65, 1, "none", "empty_row", True, None, None),
    (1, 2, 2, 300, 300, 200, "shared", "holes", True, 100, 30.0),
]


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "-".join(str(x) for x in c))
@pytest.mark.parametrize("num_splits", [0, 1, 2])
def test_prefill_kernel_matches_oracle(case, D, dtype, num_splits):
    cuda = _cuda_backend()
    B, Hq, Hkv, Lq, Lk, P, mode, padding, causal, window, softcap = case
    q, k, v, kpm, pub, norm = make_case(B, Hq, Hkv, Lq, Lk, D, P, mode, S=2, dtype=dtype, padding=padding)
    scale = 0.7 / math.sqrt(D)
    ref_out, ref_lse = oracle(q, k, v, kpm, pub, causal, scale, softcap, window)
    out, lse = run_backend(cuda, q, k, v, kpm, norm, causal, scale, softcap, window, num_splits=num_splits,
                           force_config=1)
    check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [0, 1])
@pytest.mark.parametrize("case", [DECODE_CASES[1], DECODE_CASES[4], DECODE_CASES[5], PREFILL_CASES[2], PREFILL_CASES[4]],
                         ids=lambda c: "-".join(str(x) for x in c))
def test_head_dim_256(case, config, dtype):
    """Gemma-2-style head dim 256 (with softcap in some cases): Q fragments re-read from smem, 32-key tiles."""
    cuda = _cuda_backend()
    B, Hq, Hkv, Lq, Lk, P, mode, padding, causal, window, softcap = case
    q, k, v, kpm, pub, norm = make_case(B, Hq, Hkv, Lq, Lk, 256, P, mode, S=2, dtype=dtype, padding=padding, seed=9)
    ref_out, ref_lse = oracle(q, k, v, kpm, pub, causal, 256 ** -0.5, softcap, window)
    out, lse = run_backend(cuda, q, k, v, kpm, norm, causal, 256 ** -0.5, softcap, window, force_config=config)
    check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("case", DECODE_CASES[:4] + PREFILL_CASES[:4], ids=lambda c: "-".join(str(x) for x in c))
def test_automatic_config_and_non_contiguous_views(case):
    """Auto tile/split choice, with q/k/v as the (B, L, H, D)->(B, H, L, D) views transformers passes."""
    cuda = _cuda_backend()
    B, Hq, Hkv, Lq, Lk, P, mode, padding, causal, window, softcap = case
    dtype, D = torch.bfloat16, 128
    q, k, v, kpm, pub, norm = make_case(B, Hq, Hkv, Lq, Lk, D, P, mode, dtype=dtype, padding=padding, seed=3)
    qv, kv_, vv = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    if Lq > 1:
        assert not qv.is_contiguous()
    ref_out, ref_lse = oracle(q, k, v, kpm, pub, causal, D ** -0.5, softcap, window)
    out, lse = run_backend(cuda, qv, kv_, vv, kpm, norm, causal, D ** -0.5, softcap, window)
    check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["none", "shared", "per_sample", "pool"])
@pytest.mark.parametrize("shape", ["decode", "prefill"])
def test_public_op_forward(backend, mode, shape):
    """fastprompt.ops.prefix_attention(..., backend=...) end to end (checks, normalization, custom op)."""
    if backend == "cuda":
        _cuda_backend()
    import fastprompt as fp

    dtype, D = torch.float16, 64
    B, Hq, Hkv, Lq, Lk = (4, 8, 2, 1, 1500) if shape == "decode" else (2, 8, 2, 160, 160)
    q, k, v, kpm, pub, _ = make_case(B, Hq, Hkv, Lq, Lk, D, 24, mode, S=3, dtype=dtype, padding="holes", seed=5)
    ref_out, ref_lse = oracle(q, k, v, kpm, pub, True, None, None, None)
    with torch.no_grad():
        out, lse = fp.ops.prefix_attention(q, k, v, pub["prefix_k"], pub["prefix_v"], prefix_index=pub["prefix_index"],
                                           key_padding_mask=kpm, causal=True, backend=backend, return_lse=True)
    check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["shared", "pool"])
def test_public_op_backward(backend, mode):
    """Gradients through the op (the CUDA backend's backward is the Triton one) against the float64 oracle."""
    if backend == "cuda":
        _cuda_backend()
    import fastprompt as fp

    dtype, D = torch.bfloat16, 64
    q, k, v, kpm, pub, _ = make_case(2, 4, 2, 48, 48, D, 12, mode, S=2, dtype=dtype, padding="holes", seed=7)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, pub["prefix_k"], pub["prefix_v"])]
    out = fp.ops.prefix_attention(*leaves, prefix_index=pub["prefix_index"], key_padding_mask=kpm, softcap=20.0,
                                  backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    from fastprompt import reference

    ref = reference.prefix_attention(*ref_leaves, prefix_index=pub["prefix_index"], key_padding_mask=kpm,
                                     softcap=20.0)
    ref.backward(grad.double())
    assert _rel(out, ref) < TOL[dtype]
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), leaves, ref_leaves):
        err = _rel(a.grad, b.grad)
        assert err < 5e-2, f"{name}: relative error {err:.3e}"


# ------------------------------------------------------------------ gather / mix

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index_shape", [(6,), (4, 3)])
def test_gather_kernels(dtype, index_shape):
    _cuda_backend()
    from fastprompt.ops import gather_mix_cuda

    N, F = 7, 5 * 96 + 3
    pool = torch.randn(N, F, device=DEVICE).to(dtype)
    index = torch.randint(-1, N, index_shape, device=DEVICE)
    index.view(-1)[0] = 2
    index.view(-1)[1] = 2  # repeated entry: the backward must accumulate
    flat = index.reshape(-1)
    out = gather_mix_cuda.gather_forward(pool, flat)
    ref = torch.where((flat >= 0)[:, None], pool.double()[flat.clamp_min(0)], torch.zeros((), dtype=torch.float64,
                                                                                            device=DEVICE))
    assert out.dtype == dtype and torch.equal(out.double(), ref)
    grad = torch.randn(flat.numel(), F, device=DEVICE).to(dtype)
    dpool = gather_mix_cuda.gather_backward(grad, flat, N)
    ref_dpool = torch.zeros(N, F, dtype=torch.float64, device=DEVICE).index_add_(
        0, flat.clamp_min(0), grad.double() * (flat >= 0)[:, None])
    assert dpool.dtype == dtype and _rel(dpool, ref_dpool) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
def test_mix_kernels(dtype, sparse):
    _cuda_backend()
    from fastprompt.ops import gather_mix_cuda

    B, N, F, K = 5, 9, 2 * 128 * 5, 3
    pool = torch.randn(N, F, device=DEVICE).to(dtype)
    if sparse:
        index = torch.randint(-1, N, (B, K), device=DEVICE)
        index[:, 0] = 4  # shared entry across the batch: scatter-add collisions
        weights = torch.randn(B, K, device=DEVICE)
        ent = pool.double()[index.clamp_min(0)] * (index >= 0)[..., None]
    else:
        index = None
        weights = torch.softmax(torch.randn(B, N, device=DEVICE), -1)
        ent = pool.double()[None].expand(B, N, F)
    out = gather_mix_cuda.mix_forward(pool, weights, index)
    ref = torch.einsum("bk,bkf->bf", weights.double(), ent)
    assert out.dtype == dtype and _rel(out, ref) < TOL[dtype]
    grad = torch.randn(B, F, device=DEVICE).to(dtype)
    dpool, dw = gather_mix_cuda.mix_backward(grad, pool, weights, index)
    ref_dw = torch.einsum("bf,bkf->bk", grad.double(), ent)
    contrib = weights.double()[..., None] * grad.double()[:, None, :]
    if sparse:
        ref_dpool = torch.zeros(N, F, dtype=torch.float64, device=DEVICE).index_add_(
            0, index.clamp_min(0).reshape(-1), (contrib * (index >= 0)[..., None]).reshape(-1, F))
    else:
        ref_dpool = contrib.sum(0)
    assert dpool.dtype == dtype and dw.dtype == weights.dtype
    assert _rel(dpool, ref_dpool) < TOL[dtype]
    assert _rel(dw, ref_dw) < TOL[dtype]


def test_gather_mix_float64_falls_back_exactly():
    _cuda_backend()
    from fastprompt.ops import gather_mix_cuda

    pool = torch.randn(4, 10, dtype=torch.float64, device=DEVICE)
    index = torch.tensor([3, -1, 0], device=DEVICE)
    out = gather_mix_cuda.gather_forward(pool, index)
    assert torch.equal(out[0], pool[3]) and torch.equal(out[1], torch.zeros_like(pool[0]))
    w = torch.randn(2, 4, dtype=torch.float64, device=DEVICE)
    assert torch.allclose(gather_mix_cuda.mix_forward(pool, w, None), w @ pool)


def test_float32_prefix_with_half_inputs():
    """fp32 prefix parameters (mixed precision) are cast once to q's dtype, never batch-expanded."""
    cuda = _cuda_backend()
    dtype, D = torch.bfloat16, 128
    q, k, v, kpm, pub, norm = make_case(3, 8, 2, 1, 500, D, 20, "pool", S=2, dtype=dtype, padding="holes", seed=11)
    pub = dict(pub, prefix_k=pub["prefix_k"].float(), prefix_v=pub["prefix_v"].float())
    norm = dict(norm, prefix_k=norm["prefix_k"].float(), prefix_v=norm["prefix_v"].float())
    assert cuda.not_supported_reasons(_args(q, k, v, kpm, norm, True, D ** -0.5, None, None), False) == []
    ref_out, ref_lse = oracle(q, k, v, kpm, pub, True, D ** -0.5, None, None)
    out, lse = run_backend(cuda, q, k, v, kpm, norm, True, D ** -0.5, None, None)
    check(out, lse, ref_out, ref_lse, dtype)
