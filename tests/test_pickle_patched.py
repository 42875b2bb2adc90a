"""Patched models survive pickle, torch.save / torch.load(weights_only=False) and copy.deepcopy: the copy is still
patched (bound to itself, not to the original), gives identical outputs and tokens, and unpatches exactly."""
import copy
import io
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import PAD, make_inputs, tiny_model, tiny_peft_pair

import fastprompt as fp
import fastprompt.patching as fpp
from fastprompt.integrations.peft import is_patched
from fastprompt.integrations.prompt_attach import attached_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pickle(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"pickle": _pickle, "torch.save": _torch_save, "deepcopy": copy.deepcopy}


def _outputs(model, ids, mask, **extra):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                pad_token_id=PAD, **extra)
    return logits, tokens


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("method", ["prefix", "prompt", "mpt"])
def test_patched_peft_model_round_trips(method, how):
    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=3)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=2, seq=5, padding="left")
    extra = {"task_ids": torch.tensor([2, 0])} if method == "mpt" else {}
    before = _outputs(patched, ids, mask, **extra)
    clone = ROUND_TRIPS[how](patched)
    assert is_patched(clone) and clone is not patched
    assert clone.forward.__self__ is clone if method == "prefix" else clone.get_prompt.__self__ is clone
    _assert_same(_outputs(clone, ids, mask, **extra), before)
    # the copy is independent: changing it leaves the original alone
    with torch.no_grad():
        next(p for p in clone.parameters() if p.requires_grad).add_(1.0)
    _assert_same(_outputs(patched, ids, mask, **extra), before)
    # unpatching the copy restores PEFT's own model
    fpp.unpatch_model(clone)
    assert not is_patched(clone) and "forward" not in clone.__dict__ and "get_prompt" not in clone.__dict__
    with torch.no_grad():
        next(p for p in clone.parameters() if p.requires_grad).sub_(1.0)
        torch.testing.assert_close(clone(input_ids=ids, attention_mask=mask, **extra).logits,
                                   oracle(input_ids=ids, attention_mask=mask, **extra).logits, rtol=1e-5, atol=1e-6)


def _prompt(kind, model):
    if kind == "prompt_tuning":
        return fp.PromptTuning(model, num_virtual_tokens=3)
    if kind == "pool_prefix":
        return fp.PromptPool(model, pool_size=4, length=2, top_k=2, placement="prefix", init_std=0.5)
    if kind == "pool_input":
        return fp.PromptPool(model, pool_size=4, length=2, top_k=1, init_std=0.5)
    raise KeyError(kind)


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("kind", ["prompt_tuning", "pool_prefix", "pool_input"])
def test_attached_prompt_round_trips(kind, how):
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    prompt = _prompt(kind, model)
    fpp.patch_model(model, prompt)
    ids, mask = make_inputs(batch=2, seq=5, padding="left")
    before = _outputs(model, ids, mask)
    clone = ROUND_TRIPS[how](model)
    assert attached_prompt(clone) is clone.fastprompt_prompt and attached_prompt(clone) is not prompt
    _assert_same(_outputs(clone, ids, mask), before)
    fpp.unpatch_model(clone)
    assert attached_prompt(clone) is None and "forward" not in clone.__dict__
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    _assert_same(_outputs(model, ids, mask), before)  # the original is untouched


def test_torch_load_in_a_fresh_process(tmp_path):
    """Loading where fastprompt's attention was never registered (a new process) registers it again."""
    patched, _ = tiny_peft_pair("llama", "prefix", "CAUSAL_LM", num_virtual_tokens=3)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=2, seq=5, padding="left")
    with torch.no_grad():
        want = patched(input_ids=ids, attention_mask=mask).logits
    torch.save({"model": patched, "ids": ids, "mask": mask, "want": want}, tmp_path / "model.pt")
    script = (
        "import torch; torch.set_num_threads(1); from fastprompt.integrations.peft import is_patched\n"
        f"d = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "m = d['model']; assert is_patched(m)\n"
        "with torch.no_grad(): got = m(input_ids=d['ids'], attention_mask=d['mask']).logits\n"
        "torch.testing.assert_close(got, d['want'], rtol=1e-5, atol=1e-6); print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
