"""On a GPU: a patched PEFT prefix-tuned model with backend="auto" (CUDA / Triton kernels) = unpatched PEFT
(its forward; generation against the no-cache oracle over that forward).

Skipped on CPU-only machines (the CPU lane covers the torch and Triton-interpreter backends)."""
import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import (
    assert_beam_scores_match,
    assert_greedy_matches,
    assert_step_parity,
    greedy_no_cache,
    make_inputs,
    peft_or_hand_written_prefix,
    tiny_peft_pair,
)

import fastprompt.patching as fpp

pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("family,task", [("llama", "CAUSAL_LM"), ("gemma2", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
def test_patched_prefix_tuning_on_gpu(family, task):
    patched, oracle = tiny_peft_pair(family, "prefix_proj", task)
    patched, oracle = patched.cuda(), oracle.cuda()
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="hole")
    ids, mask = ids.cuda(), mask.cuda()  # before the probe: it runs the oracle (found on an H100, 2026-12-05)
    oracle = peft_or_hand_written_prefix(oracle, ids, mask)
    assert_step_parity(patched, oracle, task, ids, mask, what=f"cuda/{family}")


def test_patched_generate_on_gpu():
    patched, oracle = tiny_peft_pair("qwen2", "prefix", "CAUSAL_LM")
    patched, oracle = patched.cuda(), oracle.cuda()
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    kwargs = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=6, do_sample=False, pad_token_id=1)
    ids, mask = ids.cuda(), mask.cuda()
    assert_greedy_matches(patched.generate(**kwargs), greedy_no_cache(oracle, ids, mask, 6, eos=3), "cuda greedy")
    beams = patched.generate(**kwargs, num_beams=2, length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
    assert_beam_scores_match(beams, oracle, ids, mask, eos=3)
