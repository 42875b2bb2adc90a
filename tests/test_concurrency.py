"""Concurrent inference on ONE patched model: N threads x M calls, each result against the same call made alone.

A web server that serves one model from a thread pool calls it from several threads at once. Whatever one call
computes (the layer prefixes it hands to the attention, the prompt K/V that hoisting captures, a pool's query and
selection, the lower layers the query pass reuses, generate()'s prompt state) must travel with that call, never sit
on the shared model where another thread's call reads or overwrites it. The oracle is each call's own result, made
single-threaded on the same model beforehand (the unpatched model is exact under the same load).

Every integration path: hoisted PEFT prompt tuning and multitask prompt tuning, PEFT prefix tuning, fastprompt's
PromptPool (prefix and input placement, with a query pass that reuses the lower layers), MultiTaskPrompt with
task_ids, T5 prefix tuning (PEFT's and fastprompt's own), and generate() on the hoisted and the prefix paths.

Sized for CI (well under a minute on a shared 2-core CPU). FASTPROMPT_STRESS=1 runs more threads and calls.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastprompt as fp
from integration_helpers import make_inputs, needs_peft, single_thread, tiny_model, tiny_peft_pair  # noqa: F401
from seq2seq_helpers import requires_seq2seq_transformers

STRESS = os.environ.get("FASTPROMPT_STRESS") == "1"
THREADS = 8 if STRESS else 4
CALLS = 40 if STRESS else 6  # per thread


@pytest.fixture(autouse=True)
def frequent_thread_switches():
    """Switch Python threads often (the default 5 ms lets a tiny model's call finish in one slice)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(previous)


def _inputs(case: int, batch: int = 3, seq: int = 6):
    """A different batch per case (ids, padding, and so prompt choices differ between concurrent calls)."""
    ids, mask = make_inputs(batch, seq + case % 3, ("left", "none")[case % 2], seed=100 + case)
    return ids, mask


def _run_concurrently(call, cases: int):
    """`call(case)` single-threaded for every case (the oracle), then THREADS x CALLS calls at once; every result
    must equal its single-threaded one. Exceptions in a thread fail the test."""
    with torch.no_grad():
        expected = [call(case) for case in range(cases)]

    def worker(thread: int):
        results = []
        with torch.no_grad():
            for i in range(CALLS):
                case = (thread * 7 + i) % cases
                results.append((case, call(case)))
        return results

    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = [f.result() for f in [pool.submit(worker, t) for t in range(THREADS)]]
    wrong = []
    for results in outcomes:
        for case, got in results:
            want = expected[case]
            if got.shape != want.shape or not torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6):
                diff = (got.double() - want.double()).abs().max().item() if got.shape == want.shape else "shape"
                wrong.append((case, diff))
    total = THREADS * CALLS
    assert not wrong, f"{len(wrong)} of {total} concurrent calls differ from the same call made alone: {wrong[:5]}"


CASES = 5


# ----------------------------------------------------------------------------------------------------------------
# PEFT


@pytest.mark.parametrize("method", ["prompt", "mpt", "prefix"])
def test_peft_forward_in_threads(method):
    needs_peft()
    model, _ = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=4)
    fp.patch_model(model)
    task_ids = [torch.tensor([c % 3, (c + 1) % 3, c % 3]) for c in range(CASES)]

    def call(case):
        ids, mask = _inputs(case)
        extra = {"task_ids": task_ids[case]} if method == "mpt" else {}
        return model(input_ids=ids, attention_mask=mask, **extra).logits

    _run_concurrently(call, CASES)
    if method != "prefix":
        assert fp.integrations.prompt_hoisting.last_prompt_path(model) == "hoisted"


@pytest.mark.parametrize("method", ["prompt", "mpt", "prefix"])
def test_peft_generate_in_threads(method):
    needs_peft()
    model, _ = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=4)
    fp.patch_model(model)
    task_ids = [torch.tensor([c % 3, (c + 2) % 3, (c + 1) % 3]) for c in range(CASES)]

    def call(case):
        ids, mask = _inputs(case)
        extra = {"task_ids": task_ids[case]} if method == "mpt" else {}
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              pad_token_id=1, eos_token_id=None, **extra)

    _run_concurrently(call, CASES)


@requires_seq2seq_transformers
def test_peft_seq2seq_prefix_in_threads():
    peft = needs_peft()
    from seq2seq_helpers import peft_seq2seq_pair, seq2seq_inputs

    model, _ = peft_seq2seq_pair("t5", peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    fp.patch_model(model)

    def call(case):
        ids, mask, labels, decoder_mask = seq2seq_inputs("t5", seed=case, tgt=4 + case % 2)
        return model(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask).logits

    _run_concurrently(call, CASES)

    def generate(case):
        ids, mask, _, _ = seq2seq_inputs("t5", seed=case)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)

    _run_concurrently(generate, CASES)


# ----------------------------------------------------------------------------------------------------------------
# fastprompt's own prompts


def _randomized(prompt):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in prompt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return prompt.eval()


OWN_PROMPTS = {
    "pool_prefix": lambda m: fp.PromptPool(m, pool_size=6, length=2, top_k=2, placement="prefix"),
    "pool_prefix_query_layer": lambda m: fp.PromptPool(m, pool_size=6, length=2, top_k=2, placement="prefix",
                                                       layers=[1], query_layer=1),
    "pool_input": lambda m: fp.PromptPool(m, pool_size=6, length=2, top_k=2, placement="input"),
    "prompt_tuning": lambda m: fp.PromptTuning(m, num_virtual_tokens=3),
    "multitask_selector": lambda m: fp.MultiTaskPrompt(m, num_tasks=3, variant="selector", pool_size=4, length=3),
    "multitask_mpt": lambda m: fp.MultiTaskPrompt(m, num_tasks=3, variant="mpt", length=3, rank=2),
}


@pytest.mark.parametrize("kind", sorted(OWN_PROMPTS))
def test_own_prompt_forward_in_threads(kind):
    model = tiny_model("llama")
    prompt = _randomized(OWN_PROMPTS[kind](model))
    fp.patch_model(model, prompt)
    task_ids = [torch.tensor([c % 3, (c + 1) % 3, (c + 2) % 3]) for c in range(CASES)]

    def call(case):
        ids, mask = _inputs(case)
        extra = {"task_ids": task_ids[case]} if prompt.needs_task_ids else {}
        return model(input_ids=ids, attention_mask=mask, **extra).logits

    _run_concurrently(call, CASES)


@pytest.mark.parametrize("kind", ["pool_prefix", "prompt_tuning", "multitask_mpt"])
def test_own_prompt_generate_in_threads(kind):
    model = tiny_model("llama")
    prompt = _randomized(OWN_PROMPTS[kind](model))
    fp.patch_model(model, prompt)
    task_ids = [torch.tensor([c % 3, (c + 1) % 3, (c + 2) % 3]) for c in range(CASES)]

    def call(case):
        ids, mask = _inputs(case)
        extra = {"task_ids": task_ids[case]} if prompt.needs_task_ids else {}
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              pad_token_id=1, eos_token_id=None, **extra)

    _run_concurrently(call, CASES)


@requires_seq2seq_transformers
@pytest.mark.parametrize("kind", ["prefix", "pool_prefix"])
def test_own_prompt_seq2seq_in_threads(kind):
    from seq2seq_helpers import seq2seq_inputs, tiny_seq2seq

    model = tiny_seq2seq("t5")
    maker = {"prefix": lambda c: fp.PrefixTuning(c, num_virtual_tokens=3, encoder_hidden_size=16),
             "pool_prefix": lambda c: fp.PromptPool(c, pool_size=5, length=2, top_k=2, placement="prefix")}[kind]
    prompt = _randomized(maker(model.config))
    fp.patch_model(model, prompt)

    def call(case):
        ids, mask, labels, decoder_mask = seq2seq_inputs("t5", seed=case, tgt=4 + case % 2)
        return model(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask).logits

    _run_concurrently(call, CASES)
