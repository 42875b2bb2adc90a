"""Fused attention dropout in prefix_attention (dropout_p > 0).

The mask is a pure function of (seed, offset, b, h, i, j) (fastprompt/attention_dropout.py): the float64
reference rebuilds it from the seed the op drew, so forward and all five gradients are compared exactly, on the
torch path and on the Triton kernels (interpreted). Plus: the generator against Random123's published answers,
the Triton generator against the torch one, keep rate and unbiasedness, reproducibility under torch.manual_seed,
eval (dropout_p=0) untouched, torch.compile, and a BERT prefix-tuning training step in train() mode that matches an
unpatched PEFT oracle drawing the same mask and builds no [B, H, P+S, D] K/V nor [B, H, Lq, P+S] scores.
"""
import importlib.util
import os

import pytest
import torch

import fastprompt as fp
from attention_cases import Case, assert_compiled_matches_eager, make_inputs, op_kwargs, opcheck_args, relative_error
from fastprompt import attention_dropout, reference
from fastprompt.ops.prefix_attention_torch import dropout as prefix_attention_torch_dropout
from fastprompt.attention_dropout import draw_dropout_seed, keep_mask, keep_mask_elementwise, philox4x32
from fastprompt.ops.prefix_attention_inputs import check_prefix_attention_args

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
_triton_ok = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not _triton_ok, reason="needs triton and TRITON_INTERPRET=1")


def run_with_reference(case: Case, backend: str, dropout_p: float, seed: int = 1234, lse_grad: bool = True):
    """Relative errors of out, lse and the five gradients of the op (backend) against the float64 reference that
    uses the seed the op drew (replayed: torch.manual_seed(seed) before each draw)."""
    inputs = make_inputs(case)
    names = [n for n in NAMES if inputs[n] is not None]
    ref_inputs = {n: (t.double() if n in names else t) for n, t in inputs.items()}
    for n in names:
        inputs[n].requires_grad_()
        ref_inputs[n].requires_grad_()
    torch.manual_seed(seed)
    dropout_seed = draw_dropout_seed(inputs["q"].device)
    torch.manual_seed(seed)
    out, lse = fp.ops.prefix_attention(*(inputs[n] for n in NAMES), dropout_p=dropout_p, backend=backend,
                                       return_lse=True, **op_kwargs(case, inputs))
    ref_out, ref_lse = reference.prefix_attention(*(ref_inputs[n] for n in NAMES), dropout_p=dropout_p,
                                                  dropout_seed=dropout_seed, return_lse=True,
                                                  **op_kwargs(case, ref_inputs))
    errors = {"out": relative_error(out, ref_out), "lse": relative_error(lse, ref_lse)}
    grad_out = torch.randn_like(ref_out)
    grad_lse = torch.randn_like(ref_lse).masked_fill(torch.isinf(ref_lse), 0.0)
    loss = (out.double() * grad_out).sum()
    ref_loss = (ref_out * grad_out).sum()
    if lse_grad:
        loss = loss + (lse.double().masked_fill(torch.isinf(ref_lse), 0.0) * grad_lse).sum()
        ref_loss = ref_loss + (ref_lse.masked_fill(torch.isinf(ref_lse), 0.0) * grad_lse).sum()
    grads = torch.autograd.grad(loss, [inputs[n] for n in names])
    ref_grads = torch.autograd.grad(ref_loss, [ref_inputs[n] for n in names])
    for n, g, rg in zip(names, grads, ref_grads):
        assert g.shape == inputs[n].shape and g.dtype == inputs[n].dtype, n
        errors["d" + n] = relative_error(g, rg)
    # the mask did something: the no-dropout output differs
    plain = reference.prefix_attention(*(ref_inputs[n] for n in NAMES), **op_kwargs(case, ref_inputs))
    assert relative_error(out.detach(), plain.detach()) > 1e-2
    return errors


def assert_errors_below(errors, tol, grad_tol):
    bad = {n: e for n, e in errors.items() if e > (tol if n in ("out", "lse") else grad_tol)}
    assert not bad, f"relative errors above tolerance: {bad} (all: {errors})"


# ---------------------------------------------------------------------------------------------------------------
# The generator

def test_philox_matches_random123_known_answers():
    """Philox4x32-10 known-answer vectors from Random123 (kat_vectors): counter, key -> output."""
    kats = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in kats:
        words = philox4x32(*(torch.tensor(c) for c in counter), torch.tensor(key[0]), torch.tensor(key[1]))
        assert tuple(int(w) for w in words) == expected


def test_grouped_mask_equals_elementwise_mask():
    seed = torch.tensor([0x12345678, 0x9ABCDEF0, 0xFFFFFFFE])
    rows = torch.tensor([0, 7, 2**31 + 5])[:, None, None]
    queries = torch.tensor([0, 3, 2**32 - 1])[None, :, None]
    for start, count in ((0, 13), (5, 9), (3, 1), (6, 0)):
        grouped = keep_mask(seed, 0.3, rows, queries, start, count)
        keys = torch.arange(start, start + count)
        assert torch.equal(grouped, keep_mask_elementwise(seed, 0.3, rows, queries, keys))


if _triton_ok:  # module level: a jitted function resolves the names it calls among its module's globals
    import triton
    import triton.language as tl

    from fastprompt.kernels.prefix_attention_dropout import dropout_keep, load_dropout_seed

    @triton.jit
    def _keep_kernel(SEED, Out, row_base, query_base, key_base, threshold, M: tl.constexpr, N: tl.constexpr):
        seed_lo, seed_hi, offset = load_dropout_seed(SEED, True)
        rows = row_base + tl.arange(0, M).to(tl.int64)
        queries = query_base + tl.arange(0, M)
        keys = key_base + tl.arange(0, N)
        keep = dropout_keep(seed_lo, seed_hi, offset, rows[:, None], queries[:, None], keys[None, :], threshold)
        tl.store(Out + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :], keep.to(tl.int8))


@needs_triton
def test_triton_mask_equals_torch_mask():
    for seed in (torch.tensor([1, 2, 3]), draw_dropout_seed("cpu")):
        for p, row_base, query_base, key_base in ((0.1, 0, 0, 0), (0.5, 2**31 + 17, 1000, 2**30 + 3),
                                                 (0.9, 12345, 2**31 - 16, 77)):
            out = torch.empty(16, 32, dtype=torch.int8)
            _keep_kernel[(1,)](seed, out, row_base, query_base, key_base, attention_dropout.dropout_threshold(p),
                              M=16, N=32)
            rows = torch.arange(row_base, row_base + 16)[:, None]
            queries = torch.arange(query_base, query_base + 16)[:, None]
            expected = keep_mask(seed, p, rows, queries, key_base, 32)
            assert torch.equal(out.bool(), expected)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_pairwise_independence(p):
    n_rows, n_keys = 256, 1024  # 2**18 decisions
    seed = draw_dropout_seed("cpu")
    keep = keep_mask(seed, p, torch.arange(n_rows)[:, None] * 3, torch.arange(n_rows)[:, None], 0, n_keys)
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    # neighbouring keys (the 4 words of one Philox call, and across calls) and neighbouring rows drop independently
    for a, b in ((keep[:, :-1], keep[:, 1:]), (keep[:, 0::4], keep[:, 1::4]), (keep[:, 3:-1:4], keep[:, 4::4]),
                 (keep[:-1], keep[1:])):
        both = (~a & ~b).double().mean().item()
        assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / a.numel()) ** 0.5


# ---------------------------------------------------------------------------------------------------------------
# Exactness against the reference

CASES = [
    Case(batch=2, hq=4, hkv=2, lq=9, lk=11, dim=16, plen=5, mode="shared", padding="holes"),  # GQA, causal
    Case(batch=3, hq=2, hkv=1, lq=7, lk=7, dim=8, plen=3, mode="pool_slots", pool_size=4, padding="left"),  # -1 slot
    Case(batch=2, hq=2, hkv=2, lq=5, lk=9, dim=8, plen=4, mode="per_sample", padding="right", causal=False),
    Case(batch=2, hq=3, hkv=1, lq=6, lk=6, dim=8, plen=2, mode="none", padding="none"),
    Case(batch=2, hq=2, hkv=1, lq=6, lk=10, dim=8, plen=3, mode="shared", padding="empty_row", softcap=2.0, window=4),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_backend_matches_reference(case, monkeypatch):
    # tiny chunks: several query chunks, each regenerating its own part of the mask
    monkeypatch.setattr(prefix_attention_torch_dropout, "CHUNK_SCORES", 64)
    assert_errors_below(run_with_reference(case, "torch", 0.3), 1e-5, 1e-4)


def test_torch_backend_float64_is_exact():
    case = Case(batch=2, hq=4, hkv=2, lq=7, lk=9, dim=8, plen=3, mode="pool_slots", padding="holes",
                dtype=torch.float64)
    assert_errors_below(run_with_reference(case, "torch", 0.2), 1e-12, 1e-12)


@needs_triton
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=str)
def test_triton_backend_matches_reference(case):
    assert_errors_below(run_with_reference(case, "triton", 0.3, lse_grad=case.mode != "shared"), 1e-5, 1e-4)


@needs_triton
def test_triton_multi_tile_prefix_and_sequence():
    # more keys than one 16-wide interpreter tile on both sides, P not a tile multiple, decode-like GQA packing
    case = Case(batch=2, hq=4, hkv=1, lq=3, lk=37, dim=16, plen=19, mode="per_sample", padding="holes")
    assert_errors_below(run_with_reference(case, "triton", 0.15), 1e-5, 1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Statistics, reproducibility, eval

def test_unbiased_over_many_seeds():
    """E[out] over the mask equals the no-dropout output: per element, the mean of 300 draws lies within a few
    standard errors of it. The D entries of a row share one mask, so the z-scores are correlated within a row:
    64 rows give a loose but meaningful band on their mean square. Seeded: a fixed, reproducible sample."""
    torch.manual_seed(0)
    case = Case(batch=2, hq=4, hkv=2, lq=8, lk=6, dim=4, plen=3, mode="shared", padding="holes")
    inputs = make_inputs(case)
    args = [inputs[n].double() for n in NAMES]
    plain = fp.ops.prefix_attention(*args, backend="torch", **op_kwargs(case, inputs))
    draws = torch.stack([fp.ops.prefix_attention(*args, dropout_p=0.4, backend="torch", **op_kwargs(case, inputs))
                         for _ in range(300)])
    mean, std = draws.mean(0), draws.std(0)
    z = (mean - plain) / (std / draws.shape[0] ** 0.5)
    assert torch.isfinite(z).all()
    assert 0.6 < z.square().mean().item() < 1.5
    assert z.abs().max().item() < 5.0  # a missing 1 / (1 - p) rescale gives mean z² ~ 200


def test_reproducible_under_manual_seed():
    case = Case(batch=2, hq=4, hkv=2, lq=6, lk=8, dim=8, plen=3, mode="pool_slots", padding="holes")
    inputs = make_inputs(case)

    def step(seed):
        tensors = [inputs[n].detach().clone().requires_grad_() for n in NAMES]
        torch.manual_seed(seed)
        out = fp.ops.prefix_attention(*tensors, dropout_p=0.25, backend="torch", **op_kwargs(case, inputs))
        out.square().sum().backward()
        return [out.detach()] + [t.grad for t in tensors]

    first, again, other = step(7), step(7), step(8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_each_call_draws_a_fresh_mask_from_the_generator():
    case = Case(batch=1, hq=2, hkv=2, lq=5, lk=5, dim=8, plen=2, mode="shared")
    inputs = make_inputs(case)
    args = [inputs[n] for n in NAMES]
    state = torch.get_rng_state()
    a = fp.ops.prefix_attention(*args, dropout_p=0.5, backend="torch")
    assert not torch.equal(torch.get_rng_state(), state)  # the seed came from torch's default generator
    b = fp.ops.prefix_attention(*args, dropout_p=0.5, backend="torch")
    assert not torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_eval_dropout_zero_is_deterministic_and_draws_nothing(backend):
    case = Case(batch=2, hq=4, hkv=2, lq=6, lk=8, dim=16, plen=3, mode="shared", padding="holes")
    inputs = make_inputs(case)
    args = [inputs[n] for n in NAMES]
    state = torch.get_rng_state()
    a = fp.ops.prefix_attention(*args, backend=backend, **op_kwargs(case, inputs))
    b = fp.ops.prefix_attention(*args, dropout_p=0.0, backend=backend, **op_kwargs(case, inputs))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.1", True, None])
def test_bad_dropout_p_is_refused(bad):
    case = Case(batch=1, hq=2, hkv=2, lq=3, lk=3, dim=8, mode="none")
    inputs = make_inputs(case)
    with pytest.raises(ValueError, match="dropout_p"):
        fp.ops.prefix_attention(inputs["q"], inputs["k"], inputs["v"], dropout_p=bad, backend="torch")


def test_cuda_backend_refuses_dropout_so_auto_falls_back():
    from fastprompt.ops.prefix_attention_cuda import CudaBackend

    case = Case(batch=1, hq=2, hkv=2, lq=3, lk=3, dim=64, mode="none")
    inputs = make_inputs(case)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    args = check_prefix_attention_args(q, k, v, None, None, None, None, True, None, None, None, dropout_p=0.1)
    assert any("dropout" in reason for reason in CudaBackend.not_supported_reasons(args, True))
    with pytest.raises(ValueError, match="cuda"):
        fp.ops.prefix_attention(q, k, v, dropout_p=0.1, backend="cuda")


# ---------------------------------------------------------------------------------------------------------------
# torch.library / torch.compile

def test_opcheck_with_dropout():
    from fastprompt.ops.prefix_attention import _forward_op

    case = Case(batch=2, hq=2, hkv=1, lq=3, lk=4, dim=8, plen=2, mode="pool_slots", padding="holes")
    a = opcheck_args(case)
    a.dropout_p, a.dropout_seed = 0.2, draw_dropout_seed("cpu")
    torch.library.opcheck(_forward_op, a.op_inputs() + ("torch",))


def test_torch_compile_with_dropout_matches_eager():
    case = Case(mode="shared", padding="holes")
    inputs = make_inputs(case)

    def step(q, k, v, pk, pv):
        out = fp.ops.prefix_attention(q, k, v, pk, pv, dropout_p=0.3, **op_kwargs(case, inputs))
        return out.square().sum()

    assert_compiled_matches_eager(step, inputs, NAMES)


# ---------------------------------------------------------------------------------------------------------------
# A prefix-tuning training step in train() mode (transformers + PEFT + fastprompt.patch_model)

ORACLE_ATTENTION = "fastprompt_test_dropout_oracle"


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention over the keys PEFT concatenated ([prefix; sequence]), with the 4D mask, and with dropout
    drawn the fused op's way: a seed from torch's generator at the same point, the mask rebuilt by the reference
    over the full [B, H, Lq, P + S] probabilities. Independent of fastprompt's patched path."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = query @ key.transpose(-1, -2) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if dropout > 0 and module.training:
        seed = draw_dropout_seed(query.device)
        probs = probs * reference.dropout_keep(seed, dropout, probs.shape) / (1 - reference.dropout_p_exact(dropout))
    return (probs @ value).transpose(1, 2).contiguous(), probs


def _dropout_prefix_pair(family, task):
    """(patched, oracle): identical PEFT prefix-tuning models with attention dropout 0.2 (hidden dropout 0.1)."""
    import copy

    import peft
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from integration_helpers import _AUTO, peft_config, randomize_prompt_parameters, tiny_config

    AttentionInterface.register(ORACLE_ATTENTION, _oracle_attention)
    AttentionMaskInterface.register(ORACLE_ATTENTION, eager_mask)
    cfg = tiny_config(family)
    if family == "bert":
        cfg.attention_probs_dropout_prob, cfg.hidden_dropout_prob = 0.2, 0.1
    else:
        cfg.attn_pdrop, cfg.resid_pdrop = 0.2, 0.1
    torch.manual_seed(0)
    base = _AUTO[task].from_config(cfg, attn_implementation=ORACLE_ATTENTION)
    base2 = copy.deepcopy(base)
    base2.config = copy.deepcopy(base.config)
    patched = peft.get_peft_model(base, peft_config("prefix", task, num_virtual_tokens=5))
    oracle = peft.get_peft_model(base2, peft_config("prefix", task, num_virtual_tokens=5))
    randomize_prompt_parameters(patched)
    oracle.load_state_dict(patched.state_dict())
    fp.patch_model(patched)
    return patched.train(), oracle.train()


def _written_out_peft(peft_model):
    """PEFT prefix tuning written out (ANCHORS.md §5: PEFT 0.21.2 refuses encoder prefix tuning on transformers
    5.24): the base model over a cache holding the prefix, with the attention mask extended by P ones."""

    def step(input_ids, attention_mask, labels):
        batch = input_ids.shape[0]
        plen = peft_model.peft_config["default"].num_virtual_tokens
        mask = torch.cat([attention_mask.new_ones(batch, plen), attention_mask], dim=1)
        from fastprompt.integrations.cache_compat import cache_kwarg

        base = peft_model.get_base_model()  # the cache under the name this transformers takes
        return base(input_ids=input_ids, attention_mask=mask, labels=labels,
                    **{cache_kwarg(base.forward): peft_model.get_prompt(batch)})

    return step


@pytest.mark.parametrize("family,task", [("bert", "SEQ_CLS"), ("gpt2", "CAUSAL_LM")])
def test_training_step_with_attention_dropout_matches_oracle(family, task):
    """The patched model (fused dropout inside prefix_attention) and unpatched PEFT with an eager attention that
    draws the same mask over the concatenated keys: one seed gives the same loss and prompt gradients; another
    seed a different loss (dropout is on)."""
    pytest.importorskip("peft")
    from gradient_checks import assert_grads_close
    from integration_helpers import assert_rel_close, labels_for, make_inputs as model_inputs, prompt_grads

    patched, oracle = _dropout_prefix_pair(family, task)
    ids, mask = model_inputs(padding="left")
    labels = labels_for(task, ids, mask)
    losses = []
    for step in (patched, _written_out_peft(oracle)):
        torch.manual_seed(7)
        loss = step(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    assert_rel_close(losses[0], losses[1], 1e-5, what="loss with attention dropout")
    grads_p, grads_o = prompt_grads(patched), prompt_grads(oracle)
    assert grads_p.keys() == grads_o.keys() and grads_p
    assert_grads_close(grads_p, grads_o, 1e-4, what="attention dropout")
    torch.manual_seed(8)
    with torch.no_grad():
        other = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert not torch.equal(other, losses[0])
    # eval(): no dropout, deterministic, no draw from the generator
    patched.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        a = patched(input_ids=ids, attention_mask=mask).logits
        b = patched(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)


def test_bert_prefix_tuning_training_step_materializes_no_concat_nor_scores():
    """BERT prefix tuning, train() with attention dropout 0.1: forward + backward build no [B, H, P+S, D] K/V and
    no [B, H, Lq, P+S] scores (or masks) anywhere."""
    peft = pytest.importorskip("peft")
    import transformers

    from test_prefix_attention_materialization import ShapeRecorder

    batch, heads, dim, seq, plen = 3, 4, 8, 11, 5
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=heads * dim, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=heads, max_position_embeddings=64, num_labels=3,
                                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    base = transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=plen))
    fp.patch_model(model)
    model.train()
    ids = torch.randint(3, 97, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :3] = 0
    keys = plen + seq
    forbidden = {(batch, h, keys, dim) for h in (1, heads)}  # concatenated K/V
    forbidden |= {(batch, h, seq, keys) for h in (1, heads)}  # scores, probabilities, 4D masks over [prefix; seq]
    recorder = ShapeRecorder()
    with recorder:
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss
        loss.backward()
    bad = [(f, s) for f, s in recorder.shapes if s in forbidden]
    assert not bad, f"materialized forbidden tensors: {bad}"
    assert any("randint" in f for f, _ in recorder.shapes), "the fused op drew no dropout seed: dropout was off"
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_flop_count_unchanged_by_dropout():
    from torch.utils.flop_counter import FlopCounterMode

    case = Case(mode="shared", padding="holes")
    inputs = make_inputs(case)
    counts = []
    for p in (0.0, 0.3):
        tensors = [inputs[n].detach().clone().requires_grad_() for n in NAMES]
        with FlopCounterMode(display=False) as counter:
            fp.ops.prefix_attention(*tensors, dropout_p=p, backend="torch", **op_kwargs(case, inputs)).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
