"""The subjects of the stateful property test (tests/test_stateful_patched_model.py): a patched model and an oracle
that does not use fastprompt, with the same weights, that every operation of the state machine is applied to.

Oracles (never fastprompt's code, never transformers' or PEFT's generate or cache code):
- PEFT subjects: the twin PEFT model, never patched, run without a cache. Its full forward is right on every
  transformers release; PEFT's own generate() is not on transformers >= 5.24, so generation is judged by a no-cache
  greedy loop over that forward.
- fastprompt's own prompts: the unpatched twin of the base model fed the prompt written out from a copy of the
  prompt's parameters (input level: [prompt; token embeddings]; prefix level: the selected pool entries concatenated
  in front of every layer's K/V by the plain eager attention of prompts_helpers).
A patched model that was unpatched (or a prompt detached) is compared with the oracle of the same state.

Each subject owns its parameters twice (patched side and oracle side), so gradients accumulate on each side
independently, and in-place weight updates are applied to both by name.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings

import torch

import prompts_helpers
import integration_helpers
import seq2seq_helpers

import fastprompt
from fastprompt.integrations.cache_compat import output_cache

SUBJECT_KINDS = ("peft_prompt_llama", "peft_prefix_llama", "pool_prefix_llama", "prompt_tuning_llama",
                 "peft_prefix_t5", "peft_prompt_mistral_window")


class Batch:
    """One call's inputs: ids [B, S], mask (padding "none" | "left" | "right"), labels that skip padding and the
    token after it (a padding query may see no key at all), T5 decoder inputs, and the weights of a second loss."""

    def __init__(self, subject, batch: int, seq: int, padding: str, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, subject.vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        for row in range(1, batch):  # row 0 unpadded; the others get 1..seq-2 padding tokens
            n = int(torch.randint(1, max(2, seq - 1), (1,), generator=gen))
            if padding == "left":
                mask[row, :n] = 0
            elif padding == "right":
                mask[row, -n:] = 0
        self.mask = mask
        self.ids = self.ids.masked_fill(mask == 0, subject.pad)
        after_pad = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0
        self.labels = self.ids.masked_fill((mask == 0) | after_pad, -100)
        self.decoder_ids = self.decoder_labels = None
        if subject.seq2seq:
            tgt = int(torch.randint(2, 5, (1,), generator=gen))
            self.decoder_ids = torch.randint(3, subject.vocab, (batch, tgt), generator=gen)
            self.decoder_ids[:, 0] = subject.decoder_start
            self.decoder_labels = torch.randint(3, subject.vocab, (batch, tgt), generator=gen)
            self.decoder_labels[-1, -1] = -100
        self.seed = seed

    def second_loss_weights(self, shape):
        return torch.randn(shape, generator=torch.Generator().manual_seed(self.seed + 7))


def comparable_logits(logits, mask):
    """The logits that are defined whatever the attention kernel: the real query positions (a padding query may
    see no key) and, for input-level PEFT prompts, the P virtual positions in front; flattened to [N, V]."""
    seq = mask.shape[1]
    real = logits[:, -seq:][mask.bool()]
    extra = logits[:, :logits.shape[1] - seq].reshape(-1, logits.shape[-1])
    return torch.cat([extra, real], 0)


class Subject:
    """What every subject provides; see the subclasses."""

    seq2seq = False
    is_peft = False  # a PeftModel (else a transformers model with a fastprompt prompt attached)
    hoistable = False  # input-level prompt on a causal LM: hoisting applies
    query_selected = False  # a pool: the prompt is chosen per row by a query pass over the input
    # generate(ids) / generate(input_ids=ids) / generate(inputs=ids)
    input_spellings = ("positional", "input_ids", "inputs")
    # trainable prefixes read by fastprompt's attention under reentrant checkpointing: refused with a ValueError
    # (reentrant checkpointing differentiates a layer's positional inputs only), by design
    refuses_reentrant_training = False
    num_virtual = 4
    eos: int
    pad: int
    vocab: int

    def __init__(self):
        self.patched = True
        self.hoisting = True
        self.training = False
        self.checkpointing = "off"

    # -- the model a user calls, and its state
    @property
    def model(self):
        raise NotImplementedError

    def set_training(self, mode: bool):
        self.model.train(mode)
        self.oracle_module.train(mode)
        self.training = mode

    def set_checkpointing(self, mode: str):
        """"off" | "reentrant" | "non_reentrant" on the patched side only: the oracle never checkpoints."""
        hf = self.hf_model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "off":
                hf.gradient_checkpointing_disable()
                if hasattr(hf, "_require_grads_hook"):
                    hf.disable_input_require_grads()
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
        self.checkpointing = mode

    # -- parameters on both sides
    def trainable_pairs(self):
        """{name: (patched-side parameter, oracle-side parameter)} of the parameters that train."""
        raise NotImplementedError

    def weight_pairs(self):
        """{name: (patched-side parameter, oracle-side parameter)} of every weight an update may touch."""
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool):
        for p, q in self.trainable_pairs().values():
            for t in (p, q):
                if t.grad is not None:
                    if set_to_none:
                        t.grad = None
                    else:
                        t.grad.zero_()

    # -- calls
    def call_patched(self, batch: Batch, **kw):
        raise NotImplementedError

    def call_oracle(self, batch: Batch):
        raise NotImplementedError

    def losses(self, out, batch: Batch):
        """(comparable logits, loss_a = the model's loss, loss_b = a weighted sum of the comparable logits)."""
        logits = self.comparable(out.logits, batch)
        w = batch.second_loss_weights(logits.shape)
        return logits, out.loss, (logits * w).sum() / logits.numel()

    def comparable(self, logits, batch):
        return comparable_logits(logits, batch.mask)

    def greedy_oracle(self, ids, mask, steps, wrap=lambda forward: forward):
        """Greedy tokens of a no-cache loop over the oracle's forward (`wrap` wraps that forward, to watch it)."""
        raise NotImplementedError

    def may_run_unhoisted_peft_input_prompt(self) -> bool:
        return False

    def may_run_unhoisted_own_input_prompt(self) -> bool:
        return False

    def set_hoisting(self, hoist: bool):
        from fastprompt.integrations.prompt_hoisting import set_prompt_hoisting

        set_prompt_hoisting(self.model, hoist)
        self.hoisting = hoist

    def next_logits_oracle(self, tokens, mask):
        """Logits of the last position of the whole sequence, no cache, default positions (a manual decode loop)."""
        raise NotImplementedError

    def save_and_reload(self):
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# PEFT causal LMs


class PeftCausalSubject(Subject):
    is_peft = True
    pad = integration_helpers.PAD
    eos = 3
    vocab = integration_helpers.VOCAB

    def __init__(self, family: str, method: str, seed: int, **config_overrides):
        super().__init__()
        self.method = method
        self.hoistable = method == "prompt"
        build = integration_helpers.tiny_config
        if config_overrides:
            def with_overrides(f, _build=build):
                cfg = _build(f)
                for k, v in config_overrides.items():
                    setattr(cfg, k, v)
                return cfg

            integration_helpers.tiny_config = with_overrides
        try:
            self.peft, self.oracle = integration_helpers.tiny_peft_pair(family, method, "CAUSAL_LM",
                                                                        num_virtual_tokens=self.num_virtual,
                                                                        seed=seed)
        finally:
            integration_helpers.tiny_config = build
        fastprompt.patch_model(self.peft)

    @property
    def model(self):
        return self.peft

    def may_run_unhoisted_peft_input_prompt(self) -> bool:
        window = getattr(self.peft.get_base_model().config, "sliding_window", None)
        return self.method == "prompt" and (not self.hoisting or window is not None)

    @property
    def oracle_module(self):
        return self.oracle

    @property
    def hf_model(self):
        return self.peft.get_base_model()

    def patch(self, hoist: bool):
        fastprompt.patch_model(self.peft, hoist_prompts=hoist)
        self.set_hoisting(hoist)  # hoist_prompts=True keeps what set_prompt_hoisting said before: say it again
        self.patched = True

    def unpatch(self):
        fastprompt.unpatch_model(self.peft)
        self.patched = False

    def trainable_pairs(self):
        mine = dict(self.peft.named_parameters())
        return {n: (mine[n], q) for n, q in self.oracle.named_parameters() if q.requires_grad}

    def weight_pairs(self):
        mine = dict(self.peft.named_parameters())
        return {n: (mine[n], q) for n, q in self.oracle.named_parameters()}

    def call_patched(self, batch, **kw):
        return self.peft(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.labels, **kw)

    def call_oracle(self, batch):
        return self.oracle(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.labels, use_cache=False)

    def greedy_oracle(self, ids, mask, steps, wrap=lambda forward: forward):
        # prefix tuning: generate()'s padding-aware positions (PEFT adds P); input-level prompts ignore position ids
        return integration_helpers.greedy_no_cache(wrap(self.oracle), ids, mask, steps, pad=self.pad, eos=self.eos,
                                                   positions=self.method == "prefix")

    def next_logits_oracle(self, tokens, mask):
        with torch.no_grad():
            return self.oracle(input_ids=tokens, attention_mask=mask, use_cache=False).logits[:, -1]

    def save_and_reload(self):
        """Save the patched adapter (it must equal the oracle's), scramble the prompt, load the saved adapter back."""
        import peft
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory() as mine, tempfile.TemporaryDirectory() as theirs:
            self.peft.save_pretrained(mine)
            self.oracle.save_pretrained(theirs)
            saved = load_file(os.path.join(mine, "adapter_model.safetensors"))
            want = load_file(os.path.join(theirs, "adapter_model.safetensors"))
        assert saved.keys() == want.keys(), f"saved adapter keys {sorted(saved)} != {sorted(want)}"
        for k in want:
            assert torch.equal(saved[k], want[k]), f"saved adapter tensor {k} differs from the unpatched one's"
        with torch.no_grad():
            for p, _ in self.trainable_pairs().values():
                p.add_(torch.randn_like(p))
        peft.set_peft_model_state_dict(self.peft, saved)


# ----------------------------------------------------------------------------------------------------------------
# fastprompt's own prompts on a plain transformers Llama


class OwnPromptSubject(Subject):
    pad = prompts_helpers.PAD
    eos = prompts_helpers.EOS
    vocab = prompts_helpers.VOCAB

    def __init__(self, kind: str, seed: int):
        super().__init__()
        self.kind = kind
        model = prompts_helpers.tiny_model("llama", seed=seed)
        model.requires_grad_(False)  # the base stays frozen attached or not: only the prompt trains
        self.twin = prompts_helpers.reference_copy(model)
        self.base = model
        torch.manual_seed(seed + 1)
        if kind == "pool_prefix":
            prompt = fastprompt.PromptPool(model, pool_size=4, length=2, top_k=2, placement="prefix", init_std=0.5)
        else:
            prompt = fastprompt.PromptTuning(model, num_virtual_tokens=self.num_virtual)  # token embeddings' std
        self.hoistable = kind == "prompt_tuning"
        self.refuses_reentrant_training = self.query_selected = kind == "pool_prefix"
        self.prompt = prompt.eval()
        self.oracle_prompt = copy.deepcopy(prompt)
        fastprompt.patch_model(model, prompt)

    @property
    def model(self):
        return self.base

    def may_run_unhoisted_own_input_prompt(self) -> bool:
        return self.patched and self.kind == "prompt_tuning" and not self.hoisting

    @property
    def oracle_module(self):
        return self.twin

    @property
    def hf_model(self):
        return self.base

    def set_training(self, mode: bool):
        super().set_training(mode)
        self.prompt.train(mode)
        self.oracle_prompt.train(mode)

    def patch(self, hoist: bool):
        fastprompt.patch_model(self.base, self.prompt, hoist_prompts=hoist)
        self.set_hoisting(hoist)
        self.patched = True

    def unpatch(self):
        fastprompt.unpatch_model(self.base)
        self.patched = False

    def trainable_pairs(self):
        theirs = dict(self.oracle_prompt.named_parameters())
        return {f"prompt.{n}": (p, theirs[n]) for n, p in self.prompt.named_parameters()}

    def weight_pairs(self):
        twin = dict(self.twin.named_parameters())
        pairs = {n: (p, twin[n]) for n, p in self.base.named_parameters() if not n.startswith("fastprompt_prompt.")}
        pairs.update(self.trainable_pairs())
        return pairs

    def call_patched(self, batch, **kw):
        return self.base(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.labels, **kw)

    # the prompt written out
    def _pool_prefixes(self, ids, mask):
        """{layer: (K [B, Hkv, 2k, D], V)} of the top_k pool entries chosen by the twin's mean hidden state, and
        the pull-constraint term the prompt adds to the loss."""
        prompt, c = self.oracle_prompt, self.oracle_prompt.config
        prompts_helpers.REFERENCE_PREFIXES.clear()  # the query pass runs without prompts
        with torch.no_grad():
            hidden = self.twin.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        query = (hidden * m).sum(1) / m.sum(1)
        cos = torch.nn.functional.cosine_similarity(query[:, None], prompt.keys[None], dim=-1)  # [B, N]
        top = cos.topk(c.top_k, dim=-1)
        out = {}
        for i, layer in enumerate(prompt.layers):
            k = torch.stack([torch.cat([prompt.pool[i, 0, int(n)] for n in row], dim=1) for row in top.indices])
            v = torch.stack([torch.cat([prompt.pool[i, 1, int(n)] for n in row], dim=1) for row in top.indices])
            out[layer] = (k, v)
        return out, -c.pull_constraint_coeff * top.values.mean()

    def _input_prompt_forward(self, ids, mask, labels=None, positions=None):
        rows = self.oracle_prompt.embedding.expand(ids.shape[0], -1, -1)
        embeds = torch.cat([rows, self.twin.get_input_embeddings()(ids)], 1)
        P = rows.shape[1]
        ext = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], 1)
        kw = {}
        if labels is not None:
            kw["labels"] = torch.cat([torch.full((ids.shape[0], P), -100), labels], 1)
        if positions == "mask":
            kw["position_ids"] = prompts_helpers.positions_from_mask(ext)
        return self.twin(inputs_embeds=embeds, attention_mask=ext, use_cache=False, **kw)

    def call_oracle(self, batch):
        if not self.patched:
            prompts_helpers.REFERENCE_PREFIXES.clear()
            return self.twin(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.labels, use_cache=False)
        if self.kind == "prompt_tuning":
            return self._input_prompt_forward(batch.ids, batch.mask, batch.labels)
        prefixes, aux = self._pool_prefixes(batch.ids, batch.mask)
        prompts_helpers.REFERENCE_PREFIXES.update(prefixes)
        try:
            out = self.twin(input_ids=batch.ids, attention_mask=batch.mask, labels=batch.labels, use_cache=False)
        finally:
            prompts_helpers.REFERENCE_PREFIXES.clear()
        out.loss = out.loss + aux
        return out

    def greedy_oracle(self, ids, mask, steps, wrap=lambda forward: forward, chosen_from=None):
        """chosen_from: (ids, mask) a pool's entries are chosen from (a reused cache's prefill), else ids / mask."""
        greedy = integration_helpers.greedy_no_cache
        if not self.patched:
            prompts_helpers.REFERENCE_PREFIXES.clear()
            return greedy(wrap(self.twin), ids, mask, steps, pad=self.pad, eos=self.eos)
        if self.kind == "prompt_tuning":
            def forward(input_ids, attention_mask, **_):
                return self._input_prompt_forward(input_ids, attention_mask, positions="mask")

            with torch.no_grad():
                return greedy(wrap(forward), ids, mask, steps, pad=self.pad, eos=self.eos, positions=False)
        with torch.no_grad():  # the pool entries are chosen once, from the prompt the caller gave
            prefixes, _ = self._pool_prefixes(*(chosen_from or (ids, mask)))
        prompts_helpers.REFERENCE_PREFIXES.update(prefixes)
        try:
            return greedy(wrap(self.twin), ids, mask, steps, pad=self.pad, eos=self.eos)
        finally:
            prompts_helpers.REFERENCE_PREFIXES.clear()

    def next_logits_oracle(self, tokens, mask, chosen_from=None):
        with torch.no_grad():
            if not self.patched:
                prompts_helpers.REFERENCE_PREFIXES.clear()
                return self.twin(input_ids=tokens, attention_mask=mask, use_cache=False).logits[:, -1]
            if self.kind == "prompt_tuning":
                return self._input_prompt_forward(tokens, mask).logits[:, -1]
            ids, first_mask = chosen_from
            prefixes, _ = self._pool_prefixes(ids, first_mask)
            prompts_helpers.REFERENCE_PREFIXES.update(prefixes)
            try:
                return self.twin(input_ids=tokens, attention_mask=mask, use_cache=False).logits[:, -1]
            finally:
                prompts_helpers.REFERENCE_PREFIXES.clear()

    def save_and_reload(self):
        """save_pretrained / load_prompt round trip; the loaded prompt replaces the attached one."""
        with tempfile.TemporaryDirectory() as path:
            self.prompt.save_pretrained(path)
            loaded = fastprompt.load_prompt(path, self.base)
        loaded.train(self.training)
        for name, (p, q) in self.trainable_pairs().items():
            q.grad = None  # a fresh prompt: no gradient on either side
        if self.patched:
            fastprompt.unpatch_model(self.base)
            fastprompt.patch_model(self.base, loaded, hoist_prompts=self.hoisting)
            if self.checkpointing != "off":  # unpatch restores the model, checkpointing flags included or not
                self.set_checkpointing(self.checkpointing)
        self.prompt = loaded
        for name, (p, q) in self.trainable_pairs().items():
            assert torch.equal(p, q), f"{name}: the reloaded prompt differs from the saved one"


# ----------------------------------------------------------------------------------------------------------------
# PEFT prefix tuning on a tiny T5


class PeftT5PrefixSubject(PeftCausalSubject):
    seq2seq = True
    num_virtual = 3
    pad = 0
    eos = 1
    vocab = seq2seq_helpers.VOCAB
    decoder_start = 0
    # PEFT's seq2seq generate(**kwargs) takes no positional argument and requires input_ids=, patched or not
    input_spellings = ("input_ids",)
    refuses_reentrant_training = True

    def __init__(self, seed: int):
        Subject.__init__(self)
        import peft

        self.method = "prefix"
        cfg = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=self.num_virtual)
        self.peft, self.oracle = seq2seq_helpers.peft_seq2seq_pair("t5", cfg, seed=seed)
        fastprompt.patch_model(self.peft)

    def call_patched(self, batch, **kw):
        return self.peft(input_ids=batch.ids, attention_mask=batch.mask, decoder_input_ids=batch.decoder_ids,
                         labels=batch.decoder_labels, **kw)

    def call_oracle(self, batch):
        return self.oracle(input_ids=batch.ids, attention_mask=batch.mask, decoder_input_ids=batch.decoder_ids,
                           labels=batch.decoder_labels, use_cache=False)

    def comparable(self, logits, batch):
        return logits.reshape(-1, logits.shape[-1])

    def greedy_oracle(self, ids, mask, steps, wrap=lambda forward: forward):
        """Greedy decoding over the unpatched PEFT model's full forward, the decoder input growing by one token per
        step; finished rows get padding, as generate() does. Returns the decoder sequences [B, 1 + new]."""
        forward = wrap(self.oracle)
        decoder = torch.full((ids.shape[0], 1), self.decoder_start, dtype=torch.long)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool)
        with torch.no_grad():
            for _ in range(steps):
                logits = forward(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder,
                                 use_cache=False).logits[:, -1]
                nxt = logits.argmax(-1).masked_fill(finished, self.pad)
                finished = finished | (nxt == self.eos)
                decoder = torch.cat([decoder, nxt[:, None]], 1)
                if bool(finished.all()):
                    break
        return decoder

    def next_logits_oracle(self, ids, mask, decoder):
        with torch.no_grad():
            return self.oracle(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder,
                               use_cache=False).logits[:, -1]


def make_subject(kind: str, seed: int = 0) -> Subject:
    if kind == "peft_prompt_llama":
        return PeftCausalSubject("llama", "prompt", seed)
    if kind == "peft_prefix_llama":
        return PeftCausalSubject("llama", "prefix", seed)
    if kind == "peft_prompt_mistral_window":
        # a sliding window that generation runs past: hoisting must turn off exactly when P + length > window
        return PeftCausalSubject("mistral", "prompt", seed, sliding_window=8)
    if kind == "pool_prefix_llama":
        return OwnPromptSubject("pool_prefix", seed)
    if kind == "prompt_tuning_llama":
        return OwnPromptSubject("prompt_tuning", seed)
    if kind == "peft_prefix_t5":
        return PeftT5PrefixSubject(seed)
    raise KeyError(kind)


def cache_of(out):
    return output_cache(out)
