"""Decode-step prefix attention: CUDA kernels vs Triton vs the PEFT-style path (GPU only).

One decode step (Lq = 1) of a Llama-3-8B-like layer (Hq=32, Hkv=8, D=128, bf16) with a learned prefix shared by
the batch, over batch x cache length x prefix length. Providers:
  cuda    fastprompt.ops.prefix_attention(..., backend="cuda")   (op overhead included)
  cuda_k  the CUDA backend's forward called directly              (kernel + split merge only)
  triton  fastprompt.ops.prefix_attention(..., backend="triton")
  peft    what PEFT + transformers do per step: prefix stored per batch row in the cache, torch.cat of the whole
          cache with the new token, an explicit 4-D mask (kv_len != q_len), repeat_kv for GQA, then SDPA.
Reports median ms and the effective bandwidth of the bytes that must be read (K/V cache + one prefix copy).

    python benchmarks/bench_decode_cuda.py --out DIR [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F


def bench_ms(fn, warmup=10, rep=50):
    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    except ImportError:
        for _ in range(warmup):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(rep):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def peft_step(q, k_cache, v_cache, prefix_k_rows, prefix_v_rows, k_new, v_new, scale):
    """PEFT path for one step: the cache holds [prefix (B copies); tokens]; transformers cats, masks, repeats."""
    B, Hq, Lq, D = q.shape
    Hkv = k_cache.shape[1]
    K = torch.cat([prefix_k_rows, k_cache, k_new], dim=2)  # DynamicLayer.update re-cats the whole cache
    V = torch.cat([prefix_v_rows, v_cache, v_new], dim=2)
    mask = torch.ones(B, 1, Lq, K.shape[2], dtype=torch.bool, device=q.device)  # built because kv_len != q_len
    G = Hq // Hkv
    K = K[:, :, None].expand(B, Hkv, G, K.shape[2], D).reshape(B, Hq, K.shape[2], D)  # repeat_kv
    V = V[:, :, None].expand(B, Hkv, G, V.shape[2], D).reshape(B, Hq, V.shape[2], D)
    return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=scale)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import fastprompt as fp
    from fastprompt.ops import prefix_attention_cuda as cuda_backend

    os.makedirs(args.out, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    Hq, Hkv, D = 32, 8, 128
    scale = 1 / math.sqrt(D)
    batches = [1, 8, 64] if args.quick else [1, 8, 32, 64]
    caches = [1024, 8192] if args.quick else [1024, 4096, 8192]
    prefixes = [32, 200]
    has_cuda = cuda_backend.extension() is not None
    results = []
    for B in batches:
        for Lk in caches:
            for P in prefixes:
                torch.manual_seed(0)
                q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
                k = torch.randn(B, Hkv, Lk, D, device="cuda", dtype=dtype)
                v = torch.randn_like(k)
                pk = torch.randn(Hkv, P, D, device="cuda", dtype=dtype)
                pv = torch.randn_like(pk)
                row = dict(B=B, Lk=Lk, P=P, Hq=Hq, Hkv=Hkv, D=D, dtype=args.dtype)
                bytes_read = (2 * B * Hkv * Lk * D + 2 * Hkv * P * D + 2 * B * Hq * D) * q.element_size()
                providers = {}
                if has_cuda:
                    providers["cuda"] = lambda: fp.ops.prefix_attention(q, k, v, pk, pv, backend="cuda")
                    idx = torch.zeros(B, 1, dtype=torch.long, device="cuda")
                    providers["cuda_k"] = lambda: cuda_backend.forward(q, k, v, pk[None], pv[None], idx, 1, None,
                                                                       True, scale, 0.0, -1)
                    row["cuda_plan"] = list(cuda_backend.plan(B, Hq, Hkv, 1, Lk, D, 1, P))
                providers["triton"] = lambda: fp.ops.prefix_attention(q, k, v, pk, pv, backend="triton")
                pk_rows, pv_rows = pk[None].expand(B, -1, -1, -1).contiguous(), pv[None].expand(B, -1, -1, -1).contiguous()
                k_cache, v_cache = k[:, :, :-1].contiguous(), v[:, :, :-1].contiguous()
                k_new, v_new = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
                providers["peft"] = lambda: peft_step(q, k_cache, v_cache, pk_rows, pv_rows, k_new, v_new, scale)
                with torch.no_grad():
                    for name, fn in providers.items():
                        try:
                            ms = bench_ms(fn)
                            row[f"{name}_ms"] = ms
                            row[f"{name}_GBps"] = bytes_read / ms / 1e6
                        except Exception as exc:  # record, keep sweeping
                            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                        torch.cuda.synchronize()
                results.append(row)
                print(json.dumps(row), flush=True)
                del q, k, v, pk, pv, pk_rows, pv_rows, k_cache, v_cache
                torch.cuda.empty_cache()
    with open(os.path.join(args.out, "decode_bench.json"), "w") as fh:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=results), fh, indent=1)
    names = ["cuda", "cuda_k", "triton", "peft"]
    lines = [f"# Decode step, Hq={Hq} Hkv={Hkv} D={D} {args.dtype}, {torch.cuda.get_device_name()}", "",
             "| B | cache | P | " + " | ".join(f"{n} ms (GB/s)" for n in names) + " | peft / cuda |",
             "|---:|---:|---:|" + "---:|" * (len(names) + 1)]
    for r in results:
        cells = []
        for n in names:
            cells.append(f"{r[n + '_ms']:.4f} ({r[n + '_GBps']:.0f})" if f"{n}_ms" in r else r.get(f"{n}_error", "-"))
        ratio = f"{r['peft_ms'] / r['cuda_ms']:.2f}x" if "peft_ms" in r and "cuda_ms" in r else "-"
        lines.append(f"| {r['B']} | {r['Lk']} | {r['P']} | " + " | ".join(cells) + f" | {ratio} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "decode_bench.md"), "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
