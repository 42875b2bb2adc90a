"""Input-level prompts on ELECTRA with factorized embeddings (embedding_size != hidden_size): the prompt lives in
embedding_size space, prepended to the word embeddings before embeddings_project lifts them to hidden_size.
Oracle: the unpatched model (float64) fed inputs_embeds = [prompt; word_embeddings(ids)] with a widened mask."""
import pytest
import torch
import transformers

import fastprompt as fp
from fastprompt.prompts import PromptPool, PromptTuning, PTuning


def _electra(embedding_size=12, hidden=24, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ElectraConfig(vocab_size=61, embedding_size=embedding_size, hidden_size=hidden,
                                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                                     max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=3)
    return transformers.ElectraForSequenceClassification(cfg).double().eval()


def _oracle_logits(model, prompts, ids, mask):
    """The unpatched model's forward over [prompt; word embeddings] (prompts [B, P, E])."""
    words = model.get_input_embeddings()(ids)
    embeds = torch.cat([prompts, words], dim=1)
    full_mask = torch.cat([mask.new_ones(ids.shape[0], prompts.shape[1]), mask], dim=1)
    return model(inputs_embeds=embeds, attention_mask=full_mask).logits


@pytest.mark.parametrize("method", ["prompt_tuning", "ptuning", "pool_input"])
def test_electra_input_prompt_in_embedding_space_matches_the_oracle(method):
    model = _electra()
    oracle_model = _electra()  # same weights (same seed), never patched
    if method == "prompt_tuning":
        prompt = PromptTuning(model, num_virtual_tokens=5)
    elif method == "ptuning":
        prompt = PTuning(model, num_virtual_tokens=4)
    else:
        prompt = PromptPool(model, pool_size=4, length=3, top_k=2, placement="input", seed=0)
    prompt = prompt.double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0  # a padded row
    query = torch.randn(3, 24, generator=g, dtype=torch.float64)
    extra = {"prompt_query": query} if method == "pool_input" else {}
    with torch.no_grad():
        rows = prompt.input_prompts(3, query=query) if method == "pool_input" else prompt.input_prompts(3)
        rows = rows if rows.dim() == 3 else rows.unsqueeze(0).expand(3, -1, -1)
        assert rows.shape[-1] == 12  # embedding_size, not hidden_size
        ref = _oracle_logits(oracle_model, rows, ids, mask)
    fp.patch_model(model, prompt)
    out = model(input_ids=ids, attention_mask=mask, **extra).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-10
    # training reaches the prompt's embedding-space parameters
    out.sum().backward()
    trained = prompt.pool if method == "pool_input" else prompt.embedding
    assert trained.grad is not None and trained.grad.abs().sum() > 0


def test_a_prompt_for_another_embedding_width_is_refused_early():
    prompt = PromptTuning(_electra(embedding_size=24), num_virtual_tokens=3)  # unfactorized: 24 wide
    with pytest.raises(ValueError, match="embedding_size"):
        fp.patch_model(_electra(embedding_size=12), prompt)


def test_prompt_config_records_the_embedding_width():
    prompt = PromptTuning(_electra(), num_virtual_tokens=2)
    assert prompt.config.embedding_size == 12 and prompt.config.input_width == 12
    assert PromptTuning(_electra(embedding_size=24), num_virtual_tokens=2).config.input_width == 24
