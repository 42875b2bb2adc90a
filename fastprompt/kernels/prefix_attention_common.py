"""Pieces shared by the prefix-attention forward and backward kernels: score transform, visibility, tile configs.

Scores live in the log2 domain inside the kernels (`exp2` is one instruction, `exp` is not): the host folds
log2(e) into the scale, and the kernels turn lse back into natural log on store / load.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastprompt._versions import release

from . import interpreter_compat

interpreter_compat.apply()  # triton < 3.8 under numpy >= 2.5 (interpreter_compat.py)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The same two numbers for use inside @triton.jit code (compiled kernels only read constexpr globals).
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration. `max_head_dim` is the largest padded head dim (BLOCK_D) it is meant for."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    max_head_dim: int


# Ordered small-D first: the launcher takes the first config whose max_head_dim covers BLOCK_D. Shared memory
# (fp16/bf16, BLOCK_D = max_head_dim) stays under sm_80's 164 KB; tests/test_triton_compile.py checks it.
FWD_CONFIGS = [
    TileConfig(128, 64, 4, 3, 64),
    TileConfig(128, 64, 8, 3, 128),
    TileConfig(64, 32, 4, 2, 256),
]
# dK/dV: BLOCK_N key rows are resident, BLOCK_M query rows stream. dQ: the mirror image.
BWD_DKDV_CONFIGS = [
    TileConfig(32, 128, 4, 2, 64),
    TileConfig(32, 128, 8, 2, 128),
    TileConfig(16, 64, 4, 1, 256),
]
BWD_DQ_CONFIGS = [
    TileConfig(128, 32, 4, 2, 64),
    TileConfig(128, 32, 8, 2, 128),
    TileConfig(64, 16, 4, 1, 256),
]
# dPrefix: like dK/dV with the prefix tile resident; prefixes are short, so a smaller key tile.
BWD_DPREFIX_CONFIGS = [
    TileConfig(32, 64, 4, 2, 64),
    TileConfig(32, 64, 4, 2, 128),
    TileConfig(16, 64, 4, 1, 256),
]
# With an additive score bias (prefix_attention_bias.py) the forward and dQ kernels hold one more fp32 score-sized
# tile: at head dims <= 64 the 4-warp configs spill on sm_90 (ptxas: 384 / 76 bytes of spill stores), the 8-warp
# ones do not, so biased calls take the 8-warp config there (the same tiles).
BIASED_FWD_CONFIGS = [dataclasses.replace(FWD_CONFIGS[0], num_warps=8), *FWD_CONFIGS[1:]]
BIASED_BWD_DQ_CONFIGS = [dataclasses.replace(BWD_DQ_CONFIGS[0], num_warps=8), *BWD_DQ_CONFIGS[1:]]
# With a bias and attention dropout together (T5 training), the ptxas that triton < 3.8 ships (CUDA 12.8) crashes
# (SIGSEGV) on the 8-warp dQ config for sm_90, fp16 and bf16 alike; ptxas 12.9 (triton 3.8) and 13.0 compile it.
# There the dQ kernel keeps the 4-warp config: it compiles, with a small spill (168 bytes of stack per thread).
BIASED_DROPOUT_BWD_DQ_CONFIGS = (BIASED_BWD_DQ_CONFIGS if release(triton.__version__)[:2] >= (3, 8)
                                 else BWD_DQ_CONFIGS)
# Under TRITON_INTERPRET=1 every program runs in numpy: the smallest legal tl.dot tile keeps tests fast.
INTERPRETER_CONFIG = TileConfig(16, 16, 1, 1, 1 << 30)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def pick_config(configs, head_dim: int, element_size: int = 2) -> TileConfig:
    """The launch config for a head dim. Configs are sized for 16-bit tiles: 4-byte (fp32) inputs take the config
    meant for twice the head dim, and past the last one (fp32 at head dim 256), the last config with half the key
    tile and a single stage."""
    if interpreting():
        return INTERPRETER_CONFIG
    need = block_d(head_dim) * max(element_size, 2) // 2
    for cfg in configs:
        if cfg.max_head_dim >= need:
            return cfg
    last = configs[-1]
    return dataclasses.replace(last, block_n=max(16, last.block_n // 2), num_stages=1)


def fit_block_m(cfg: TileConfig, rows: int) -> TileConfig:
    """Shrink the query tile to the query length (decode: Lq = 1) so a program does not compute 127 dead rows;
    16 is the smallest tl.dot tile."""
    block_m = min(cfg.block_m, max(16, triton.next_power_of_2(rows)))
    if block_m == cfg.block_m:
        return cfg
    return dataclasses.replace(cfg, block_m=block_m, num_warps=min(cfg.num_warps, 4))


# DOT_PRECISION value that makes `mma` compute in fp32: TRITON_INTERPRET's numpy tl.dot multiplies bf16 operands as
# their raw uint16 bit patterns (triton 3.8), so under the interpreter bf16 tiles are widened first (exactly).
UPCAST_DOT = "upcast"


def dot_precision(dtype) -> str:
    """The DOT_PRECISION constexpr for inputs of `dtype` (a torch dtype)."""
    if dtype == torch.float32:
        return "ieee"  # fp32 would otherwise run as TF32 on GPU (~1e-3 error)
    if dtype == torch.bfloat16 and interpreting():
        return UPCAST_DOT
    return "tf32"  # ignored for 16-bit operands


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """tl.dot(a, b) + acc with fp32 accumulation; see UPCAST_DOT."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def score_log2(qk, score_scale, cap_scale, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> (score * log2(e), tanh term for the softcap gradient).

    Without softcap, score_scale = scale * log2(e). With softcap, score_scale = 2 * log2(e) * scale / softcap and
    cap_scale = softcap * log2(e): tanh(x) = 1 - 2 / (exp(2x) + 1) saturates cleanly to +-1 at both ends.
    """
    if HAS_SOFTCAP:
        t = 1.0 - 2.0 / (tl.math.exp2(qk * score_scale) + 1.0)
        return t * cap_scale, t
    else:
        return qk * score_scale, qk


@triton.jit
def sequence_visible(a, j, Lk, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Visibility of sequence key j to a query whose bottom-right aligned position is a (= i + Lk - Lq).

    `a` and `j` are broadcastable index tensors; the result has their broadcast shape.
    """
    vis = j < Lk
    if CAUSAL:
        vis = vis & (j <= a)
    if HAS_WINDOW:
        vis = vis & ((a - j) < window)
        if not CAUSAL:
            vis = vis & ((j - a) < window)
    return vis


@triton.jit
def load_sequence_tile(a, start_n, offs_n, offs_d, d_ok, k_base, v_base, KPM, b, stride_kn, stride_vn, stride_mb,
                       stride_mn, Lk, window, EDGE: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_WINDOW: tl.constexpr):
    """One sequence K/V tile and its visibility `[M, N]` to the query rows at bottom-right positions `a`.

    Edge tiles (causal diagonal, window edges, the Lk tail) get the positional mask and bounds; interior tiles
    only the padding mask, if any. Shared by the forward and the dQ kernel so both see the same keys."""
    offs = start_n + offs_n
    if EDGE:
        kv_mask = (offs[:, None] < Lk) & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(k_base + offs[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    vis = offs[None, :] >= 0
    if EDGE:
        vis = sequence_visible(a[:, None], offs[None, :], Lk, window, CAUSAL, HAS_WINDOW)
    if HAS_KPM:
        kpm = tl.load(KPM + b * stride_mb + offs * stride_mn, mask=offs < Lk, other=0)
        vis = vis & (kpm != 0)[None, :]
    return k, v, vis


@triton.jit
def round_down(x, BLOCK: tl.constexpr):
    # x >= 0 always (callers clamp first): avoids trunc-vs-floor division differences between GPU and interpreter.
    return (x // BLOCK) * BLOCK


@triton.jit
def round_up(x, BLOCK: tl.constexpr):
    return ((x + BLOCK - 1) // BLOCK) * BLOCK


@triton.jit
def sequence_key_range(m_first, m_last, Lq, Lk, window, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_WINDOW: tl.constexpr):
    """Key tiles a query tile (rows m_first..m_last) must visit, split into [lo, full_lo) masked,
    [full_lo, full_hi) mask-free (every key visible to every row, causal/window/bounds-wise), [full_hi, hi) masked.
    Tiles outside [lo, hi) are invisible to all rows and skipped."""
    a_lo = m_first + Lk - Lq
    a_hi = m_last + Lk - Lq
    lo = a_lo * 0
    hi = lo + Lk
    full_lo = lo
    full_hi = lo + Lk
    if CAUSAL:
        hi = tl.minimum(hi, a_hi + 1)
        full_hi = tl.minimum(full_hi, a_lo + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, a_lo - window + 1)
        full_lo = tl.maximum(full_lo, a_hi - window + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, a_hi + window)
            full_hi = tl.minimum(full_hi, a_lo + window)
    return split_range(lo, full_lo, full_hi, hi, BLOCK_N)


@triton.jit
def split_range(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    """Tile-align a visible index range [lo, hi) with a mask-free middle [full_lo, full_hi) (raw bounds, any sign).

    Returns aligned lo <= full_lo <= full_hi <= hi: tiles in [lo, full_lo) and [full_hi, hi) need masking; the
    middle tiles are whole and need none. An empty middle puts every tile in the masked loops."""
    hi = tl.maximum(hi, 0)
    lo = round_down(tl.minimum(tl.maximum(lo, 0), hi), BLOCK)
    full_lo = tl.minimum(tl.maximum(round_up(tl.maximum(full_lo, 0), BLOCK), lo), hi)
    full_hi = tl.minimum(tl.maximum(round_down(tl.maximum(full_hi, 0), BLOCK), full_lo), hi)
    return lo, full_lo, full_hi, hi
