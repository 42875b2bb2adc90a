"""prepare_inputs_for_generation of a patched PEFT model keeps the contract of PEFT's own.

PEFT 0.21.2's test `test_prompt_tuning_prepare_inputs_for_generation_4d_attention_mask` (tests/test_decoder_models.py)
pins it for input-level prompts: when the base model's prepare step hands back a 4D mask (sized for the real tokens
only), the prefill step's inputs are the prompt and the tokens as `inputs_embeds` of P + S positions, and the mask
covers those P + S keys. The test below makes the same call with the same fake base prepare step, on a hoisted family
(Llama) and on unhoisted ones (Gemma 3, the model of PEFT's test; Qwen2), and compares with the unpatched model.

Prefix tuning cannot keep PEFT's mask contract: PEFT's prefix lives in the cache, so its prepared mask has P more
columns; a patched model's prefix is read by the attention from its one copy and the cache holds real tokens only, so
the mask covers the real tokens only (README, PEFT section). That documented behaviour is tested too.
"""
import warnings

import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import tiny_peft_pair
from family_helpers import family_peft_pair

import fastprompt.patching as fpp
from fastprompt.integrations.peft import key_padding_mask

peft = pytest.importorskip("peft")

from fastprompt._versions import release  # noqa: E402

P = 4


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about position ids it ignores; transformers about renames
        yield


def _pair(family, method="prompt"):
    if family == "gemma3_text":
        return family_peft_pair(family, method, "CAUSAL_LM", num_virtual_tokens=P)
    return tiny_peft_pair(family, method, "CAUSAL_LM", num_virtual_tokens=P)


def _fake_base_prepare(model, input_ids, attention_mask):
    """PEFT's test: generate() has made an empty cache and the base prepare step returned a 4D mask."""
    from transformers import DynamicCache

    def fake_prepare_inputs_for_generation(*args, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "cache_position": torch.arange(input_ids.shape[1]), "past_key_values": DynamicCache()}

    model.base_model_prepare_inputs_for_generation = fake_prepare_inputs_for_generation


def _assert_peft_contract(model_kwargs, total):
    """PEFT's test's assertions, word for word."""
    assert model_kwargs["input_ids"] is None
    assert model_kwargs["inputs_embeds"].shape[1] == total
    assert "attention_mask" in model_kwargs
    new_mask = model_kwargs["attention_mask"]
    if isinstance(new_mask, torch.Tensor):
        assert new_mask.shape[-1] == total
    elif isinstance(new_mask, dict):
        assert all(mask.shape[-1] == total for mask in new_mask.values() if mask is not None)


@pytest.mark.skipif(release(peft.__version__)[:2] < (0, 21), reason="the contract of PEFT 0.21's test: PEFT 0.20's own "
                    "prepare_inputs_for_generation raises with a 4D mask on transformers 5.23 (TypeError in "
                    "create_masks_for_generate), so there is no unpatched behaviour to keep")
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_prompt_tuning_prepare_inputs_for_generation_4d_attention_mask(family):
    patched, oracle = _pair(family)
    fpp.patch_model(patched)
    input_ids = torch.tensor([[5, 6, 7]])
    attention_mask_4d = torch.ones((1, 1, input_ids.shape[1], input_ids.shape[1]))
    for model in (patched, oracle):
        _fake_base_prepare(model, input_ids, attention_mask_4d)
    got = patched.prepare_inputs_for_generation(input_ids)
    want = oracle.prepare_inputs_for_generation(input_ids)
    total = P + input_ids.shape[1]
    _assert_peft_contract(got, total)
    _assert_peft_contract(want, total)  # the unpatched model's, for the record
    torch.testing.assert_close(got["inputs_embeds"], want["inputs_embeds"])
    # the same keys are visible (PEFT's re-created mask may be 4D, a dict or None: nothing masked)
    want_keys = key_padding_mask(want["attention_mask"], total)
    want_keys = torch.ones(1, total, dtype=torch.long) if want_keys is None else want_keys
    assert torch.equal(key_padding_mask(got["attention_mask"], total), want_keys)


@pytest.mark.parametrize("kind", ["bool", "additive", "dict"])
def test_prepared_4d_mask_keeps_the_padding(kind):
    """Where the 4D mask masks a padding key, the prepared 2D mask keeps it masked (PEFT's re-created mask is all
    ones there) and the P prompt keys are visible."""
    patched, _ = _pair("llama")
    fpp.patch_model(patched)
    input_ids = torch.tensor([[1, 5, 6, 7], [8, 9, 10, 11]])
    keys = torch.tensor([[False, True, True, True], [True, True, True, True]])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    mask = (causal[None] & keys[:, None, :])[:, None]                       # [B, 1, S, S], True = visible
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    if kind == "dict":
        mask = {"full_attention": mask, "sliding_attention": None}
    _fake_base_prepare(patched, input_ids, mask)
    got = patched.prepare_inputs_for_generation(input_ids)
    _assert_peft_contract(got, P + 4)
    expected = torch.cat([torch.ones(2, P, dtype=torch.long), keys.long()], dim=1)
    assert torch.equal(got["attention_mask"], expected)


def test_key_padding_mask_rejects_other_ranks():
    with pytest.raises(ValueError, match="attention_mask must be 2D"):
        key_padding_mask(torch.ones(1, 3, 3), 3)


def test_prefix_tuning_prepared_mask_covers_the_real_tokens_only():
    """The documented difference (README): the patched prefix-tuning model's cache and mask hold real tokens only;
    positions are PEFT's (shifted by P)."""
    patched, oracle = _pair("llama", "prefix")
    fpp.patch_model(patched)
    input_ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones_like(input_ids)
    got = patched.prepare_inputs_for_generation(input_ids, attention_mask=mask)
    want = oracle.prepare_inputs_for_generation(input_ids, attention_mask=mask)
    assert torch.equal(got["attention_mask"], mask)
    assert want["attention_mask"].shape[-1] == P + 3  # PEFT: P cache entries more
    assert torch.equal(got["position_ids"], torch.arange(P, P + 3)[None])
