"""A patched model and an oracle that does not use fastprompt, driven through random sequences of what users do
(issue 19): patch, unpatch, hoisting on/off, train, eval, forward with and without grad, backward (once, twice with
retain_graph, two losses with zero_grad between), gradient checkpointing (reentrant or not), in-place weight updates
(through `.data`, under `torch.no_grad()`, by replacing `.data`), save and reload of the prompt / PEFT adapter,
generate() with its argument spellings and caches, caches reused in generate(), a manual decode loop, threads.
Every step compares the two: logits to 1e-5 of their scale, every trainable gradient to 1e-4 of the whole
gradient's scale, generated tokens equal to a no-cache greedy loop over the oracle's forward. The subjects and
their oracles are in tests/stateful_subjects.py.

CI runs a few derandomized examples per subject (well under 2 minutes on 2 loaded cores). A longer, random run:
    FASTPROMPT_STATEFUL_EXAMPLES=200 [FASTPROMPT_STATEFUL_STEPS=40] pytest tests/test_stateful_patched_model.py
FASTPROMPT_STATEFUL_ENABLE=threads,reused_cache (or "all") also runs the rules of those open defects.
"""
import copy
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import event as hypothesis_event
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

pytest.importorskip("peft")

from integration_helpers import single_thread  # noqa: F401,E402 (autouse fixture)
from stateful_subjects import SUBJECT_KINDS, Batch, make_subject  # noqa: E402

from fastprompt.integrations.cache_compat import cache_kwarg, output_cache  # noqa: E402

# Defects of issue 19 being fixed elsewhere. A rule (or argument combination) that reaches one of them is off while
# it is listed here; remove an entry when its fix merges, and everything else must keep passing.
OPEN_DEFECTS: set = set()  # all of issue 19's defects and the three this test found are fixed
_enable = os.environ.get("FASTPROMPT_STATEFUL_ENABLE", "")
OPEN_DEFECTS = set() if _enable == "all" else OPEN_DEFECTS - set(_enable.split(","))


def is_open(defect: str) -> bool:
    return defect in OPEN_DEFECTS


def event(what: str) -> None:
    """Counted in hypothesis' statistics; nothing when a rule runs outside hypothesis (the fixed sequence below)."""
    try:
        hypothesis_event(what)
    except InvalidArgument:
        pass


_EXAMPLES = int(os.environ.get("FASTPROMPT_STATEFUL_EXAMPLES", "0"))
SETTINGS = settings(
    max_examples=_EXAMPLES or 10,
    stateful_step_count=int(os.environ.get("FASTPROMPT_STATEFUL_STEPS", "30" if _EXAMPLES else "8")),
    deadline=None,
    derandomize=not _EXAMPLES,  # CI: the same sequences every run; on demand: fresh ones
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)

LOGITS_REL = 1e-5
GRAD_REL = 1e-4
TIE_REL = 1e-4  # a greedy step whose two best logits are this close may go either way


def assert_scale_close(got, want, rel, what):
    """|got - want| <= rel * (|want| + max|want|) elementwise."""
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.detach(), want.detach(), rtol=rel, atol=rel * max(scale, 1e-12),
                               msg=lambda m: f"{what}: {m}")


class Recorder:
    """Wraps an oracle forward for greedy_no_cache: keeps each step's last-position logits and the gap between the
    two best of them relative to their scale, so that a token differing at a near tie is told apart from a wrong
    token, and generate()'s own logits can be compared step by step."""

    def __init__(self, forward):
        self.forward, self.gaps, self.logits = forward, [], []

    def __call__(self, **kw):
        out = self.forward(**kw)
        last = out.logits[:, -1].float()
        top = last.topk(2, dim=-1).values
        self.logits.append(last)
        self.gaps.append(((top[:, 0] - top[:, 1]) / last.abs().amax(-1).clamp_min(1e-12)))
        return out


def assert_generated(got, want, start, recorder, what):
    """generate() with output_logits: its tokens equal the oracle's, and so do its logits at every step (to 1e-5 of
    their scale: a drift that does not flip a token is caught too); past a step where the oracle's two best logits
    were a near tie the two may part, and are compared up to there."""
    tokens = got.sequences
    width = max(tokens.shape[1], want.shape[1])
    g = torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]), value=-1)
    w = torch.nn.functional.pad(want, (0, width - want.shape[1]), value=-1)
    steps = min(len(got.logits), len(recorder.logits))
    if not torch.equal(g, w):
        diff = (g != w).nonzero()
        row, col = int(diff[0, 0]), int(diff[0, 1])
        step = col - start
        if not (0 <= step < len(recorder.gaps) and float(recorder.gaps[step][row]) < TIE_REL):
            raise AssertionError(f"{what}: generated tokens\n{tokens}\n!= no-cache greedy oracle\n{want}\n(first "
                                 f"difference at row {row}, new token {step})")
        event("generated tokens differ after a near tie")
        steps = min(steps, step + 1)
    for i in range(steps):
        assert_scale_close(got.logits[i].float(), recorder.logits[i], LOGITS_REL, f"{what}: logits of new token {i}")


class PatchedModelMachine(RuleBasedStateMachine):
    KIND = None  # set per subject kind

    @initialize(seed=st.integers(0, 3))
    def build(self, seed):
        self.subject = make_subject(self.KIND, seed)
        self.backward_ran = False

    # ------------------------------------------------------------------------------------------------------------
    # helpers

    def batch(self, batch, seq, padding, seed):
        return Batch(self.subject, batch, seq, padding, seed)

    def reentrant(self):
        return self.subject.checkpointing == "reentrant" and self.subject.training

    def refuses(self, grad_enabled: bool) -> bool:
        """A call the patched model refuses by design: trainable prefixes under reentrant checkpointing."""
        s = self.subject
        return s.patched and s.refuses_reentrant_training and self.reentrant() and grad_enabled

    def peft_itself_breaks(self, grad_enabled: bool) -> bool:
        """Unpatched PEFT prefix tuning under gradient checkpointing in training crashes on transformers 5.25
        (transformers turns use_cache off, the layers drop PEFT's prefix cache, the mask keeps its P columns:
        "size of tensor a (S) must match ... (P + S)"), with or without fastprompt ever patching it: nothing to judge."""
        s = self.subject
        return (not s.patched and s.is_peft and s.method == "prefix" and s.checkpointing != "off"
                and s.training and grad_enabled)

    def expect_refusal(self, batch):
        with pytest.raises(ValueError, match="non-reentrant gradient checkpointing"):
            self.subject.call_patched(batch)
        event("refused: trainable prefixes under reentrant checkpointing")

    def trainable(self):
        s = self.subject
        return bool(s.trainable_pairs()) and (s.patched or s.is_peft)  # a detached prompt is not in the model

    def compare_grads(self, what):
        pairs = self.subject.trainable_pairs()
        scale = max([float(q.grad.abs().max()) for _, q in pairs.values() if q.grad is not None] + [0.0])
        for name, (p, q) in pairs.items():
            if q.grad is None or p.grad is None:
                assert p.grad is None and q.grad is None, (
                    f"{what}: gradient of {name} is {'missing' if p.grad is None else 'present'} on the patched "
                    f"model but {'missing' if q.grad is None else 'present'} on the oracle")
                continue
            torch.testing.assert_close(p.grad, q.grad, rtol=GRAD_REL, atol=GRAD_REL * max(scale, 1e-12),
                                       msg=lambda m, name=name: f"{what}: gradient of {name}: {m}")

    def compare_outputs(self, got, want, batch, what):
        s = self.subject
        assert_scale_close(s.comparable(got.logits, batch), s.comparable(want.logits, batch), LOGITS_REL,
                           f"{what} logits")
        if want.loss is not None:
            assert_scale_close(got.loss, want.loss, LOGITS_REL, f"{what} loss")

    # ------------------------------------------------------------------------------------------------------------
    # model state

    @precondition(lambda self: not self.subject.patched)
    @rule(hoist=st.booleans())
    def patch(self, hoist):
        self.subject.patch(hoist)

    @precondition(lambda self: self.subject.patched)
    @rule()
    def unpatch(self):
        self.subject.unpatch()
        if self.subject.checkpointing != "off":  # unpatch restores the model as it was patched
            self.subject.set_checkpointing(self.subject.checkpointing)

    @precondition(lambda self: self.subject.patched and self.subject.hoistable)
    @rule(hoist=st.booleans())
    def set_hoisting(self, hoist):
        self.subject.set_hoisting(hoist)

    @rule(training=st.booleans())
    def set_training(self, training):
        self.subject.set_training(training)

    @rule(mode=st.sampled_from(["off", "reentrant", "non_reentrant"]))
    def set_checkpointing(self, mode):
        self.subject.set_checkpointing(mode)

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        self.subject.zero_grad(set_to_none)

    @rule(index=st.integers(0, 3) | st.integers(0, 10_000), spelling=st.sampled_from(["data", "no_grad", "replace_data"]),
          seed=st.integers(0, 2**16))
    def update_weight(self, index, spelling, seed):
        """The same in-place update on both sides: `p.data.add_(d)` (no version bump), `with torch.no_grad():
        p.add_(d)`, or `p.data = p.data + d` (new storage)."""
        pairs = self.subject.weight_pairs()
        # the weights with derived state first (small indices, so the fixed sequence below reaches them): the
        # trainable prompt, T5's relative attention bias (a cached table), then the rest
        names = sorted(pairs, key=lambda n: (not pairs[n][1].requires_grad, "relative_attention_bias" not in n, n))
        if is_open("t5_bias_data_update") and spelling == "data":
            names = [n for n in names if "relative_attention_bias" not in n] or names
        name = names[index % len(names)]
        event(f"update {spelling} {'prompt' if pairs[name][1].requires_grad else 'base'} weight")
        first = pairs[name][0]
        delta = torch.randn(first.shape, generator=torch.Generator().manual_seed(seed)) * 0.1
        delta = delta * float(first.detach().abs().mean().clamp_min(1e-3)) * 10
        for p in pairs[name]:
            if spelling == "data":
                p.data.add_(delta)
            elif spelling == "no_grad":
                with torch.no_grad():
                    p.add_(delta)
            else:
                p.data = p.data + delta

    @rule()
    def save_and_reload(self):
        self.subject.save_and_reload()

    # ------------------------------------------------------------------------------------------------------------
    # forward and backward

    @rule(batch=st.integers(1, 3), seq=st.integers(2, 6), padding=st.sampled_from(["none", "left", "right"]),
          seed=st.integers(0, 2**16), grad=st.sampled_from(["enabled", "no_grad", "inference_mode"]))
    def forward(self, batch, seq, padding, seed, grad):
        b = self.batch(batch, seq, padding, seed)
        if is_open("t5_bias_table_inference_mode") and self.subject.seq2seq and grad == "inference_mode":
            grad = "no_grad"
        if self.refuses(grad == "enabled"):
            return self.expect_refusal(b)
        if self.peft_itself_breaks(grad == "enabled"):
            return event("skipped: unpatched PEFT prefix tuning under checkpointing")
        context = {"enabled": torch.enable_grad, "no_grad": torch.no_grad,
                   "inference_mode": torch.inference_mode}[grad]
        with context():
            got = self.subject.call_patched(b)
        with torch.no_grad():
            want = self.subject.call_oracle(b)
        self.compare_outputs(got, want, b, f"forward ({grad})")

    def _losses(self, b):
        """Both sides' (logits, loss_a, loss_b), the outputs compared; None when the patched model refuses."""
        if self.refuses(True):
            return self.expect_refusal(b)
        if self.peft_itself_breaks(True):
            return event("skipped: unpatched PEFT prefix tuning under checkpointing")
        got = self.subject.call_patched(b)
        want = self.subject.call_oracle(b)
        self.compare_outputs(got, want, b, "forward for backward")
        return self.subject.losses(got, b), self.subject.losses(want, b)

    @precondition(lambda self: self.trainable())
    @rule(batch=st.integers(1, 3), seq=st.integers(2, 6), padding=st.sampled_from(["none", "left", "right"]),
          seed=st.integers(0, 2**16), second=st.booleans())
    def backward_once(self, batch, seq, padding, seed, second):
        b = self.batch(batch, seq, padding, seed)
        losses = self._losses(b)
        if losses is None:
            return
        (_, la, lb), (_, oa, ob) = losses
        (lb if second else la).backward()
        (ob if second else oa).backward()
        self.compare_grads("backward")

    @precondition(lambda self: self.trainable() and not (self.reentrant() and is_open("reentrant_double_backward")))
    @rule(batch=st.integers(1, 3), seq=st.integers(2, 6), padding=st.sampled_from(["none", "left", "right"]),
          seed=st.integers(0, 2**16))
    def backward_twice_retain_graph(self, batch, seq, padding, seed):
        b = self.batch(batch, seq, padding, seed)
        losses = self._losses(b)
        if losses is None:
            return
        (_, la, _), (_, oa, _) = losses
        for loss in (la, oa):
            loss.backward(retain_graph=True)
            loss.backward()
        self.compare_grads("backward(retain_graph=True) then backward")

    @precondition(lambda self: self.trainable() and not (self.reentrant() and is_open("reentrant_double_backward")))
    @rule(batch=st.integers(1, 3), seq=st.integers(2, 6), padding=st.sampled_from(["none", "left", "right"]),
          seed=st.integers(0, 2**16), set_to_none=st.booleans())
    def backward_two_losses_zero_grad_between(self, batch, seq, padding, seed, set_to_none):
        b = self.batch(batch, seq, padding, seed)
        losses = self._losses(b)
        if losses is None:
            return
        (_, la, lb), (_, oa, ob) = losses
        la.backward(retain_graph=True)
        oa.backward(retain_graph=True)
        self.subject.zero_grad(set_to_none)
        lb.backward()
        ob.backward()
        self.compare_grads("loss_a.backward(retain_graph=True); zero_grad(); loss_b.backward()")

    # ------------------------------------------------------------------------------------------------------------
    # generation

    def reused_cache_open(self):
        # 19.7 hits the input-level prompts (hoisted K/V registered per cache object) and the pool (its query is
        # kept per cache object: refused loudly); PEFT prefix tuning is covered now
        s = self.subject
        return is_open("reused_cache") and s.patched and (s.hoistable or s.query_selected)

    def generation_allowed(self):
        # unpatched PEFT generate() is broken on transformers >= 5.24 (PEFT's bug, not judged here)
        return self.subject.patched or not self.subject.is_peft

    @precondition(lambda self: self.generation_allowed())
    @rule(batch=st.integers(1, 3), seq=st.integers(2, 6), padding=st.sampled_from(["none", "left"]),
          seed=st.integers(0, 2**16), new=st.integers(1, 4),
          spelling=st.sampled_from(["positional", "input_ids", "inputs"]),
          length=st.sampled_from(["max_new_tokens", "max_length", "both", "config_max_new_tokens",
                                  "config_max_length", "config_both", "config_new_kwarg_length",
                                  "default_new_kwarg_length"]),
          other_length=st.integers(1, 8), cache=st.sampled_from(["dynamic", "static", "config_static"]))
    def generate(self, batch, seq, padding, seed, new, spelling, length, other_length, cache):
        from transformers import GenerationConfig

        s = self.subject
        if spelling not in s.input_spellings:
            spelling = s.input_spellings[0]
        if is_open("inputs_static_cache") and spelling == "inputs" and cache != "dynamic":
            cache = "dynamic"
        if is_open("unhoisted_static_cache_unpadded") and s.may_run_unhoisted_peft_input_prompt():
            cache = "dynamic"
        if is_open("own_prompt_unhoisted_static_cache") and s.may_run_unhoisted_own_input_prompt():
            cache = "dynamic"
        if is_open("max_new_tokens_precedence") and length.endswith("kwarg_length"):
            length = "config_max_new_tokens"
        b = self.batch(batch, seq, padding, seed)
        prompt_length = 1 if s.seq2seq else seq  # max_length counts the decoder tokens of an encoder-decoder
        # transformers: max_new_tokens wins over max_length wherever each is set (kwargs, a passed config, the
        # model's default config); a conflicting max_length then says `other_length` new tokens
        conflicting = prompt_length + other_length
        lengths, kwarg_lengths, default_lengths = {}, {}, {}
        if length in ("max_new_tokens", "config_max_new_tokens", "both", "config_both", "config_new_kwarg_length"):
            lengths["max_new_tokens"] = new
        if length in ("max_length", "config_max_length"):
            lengths["max_length"] = prompt_length + new
        if length in ("both", "config_both"):
            lengths["max_length"] = conflicting
        if length == "config_new_kwarg_length":
            kwarg_lengths["max_length"] = conflicting
        if length == "default_new_kwarg_length":
            default_lengths["max_new_tokens"] = new
            kwarg_lengths["max_length"] = conflicting
        common = dict(do_sample=False, num_beams=1, pad_token_id=s.pad, eos_token_id=s.eos)
        if s.seq2seq:
            common["decoder_start_token_id"] = s.decoder_start
        kwargs = {"attention_mask": b.mask, "output_logits": True, "return_dict_in_generate": True, **kwarg_lengths}
        if length.startswith("config"):
            config = dict(common, **lengths)
            if cache == "config_static":
                config["cache_implementation"] = "static"
            kwargs["generation_config"] = GenerationConfig(**config)
        else:
            kwargs.update(common, **lengths)
            if cache == "config_static":
                kwargs["generation_config"] = GenerationConfig(cache_implementation="static", **common)
        if cache == "static":
            kwargs["cache_implementation"] = "static"
        args = ()
        if spelling == "positional":
            args = (b.ids,)
        else:
            kwargs[spelling] = b.ids
        event(f"generate {spelling} {length} {cache}")
        defaults = s.hf_model.generation_config
        saved = {k: getattr(defaults, k) for k in default_lengths}
        try:
            for k, v in default_lengths.items():
                setattr(defaults, k, v)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                got = s.model.generate(*args, **kwargs)
        finally:
            for k, v in saved.items():
                setattr(defaults, k, v)
        want, recorder = self.greedy_oracle(b.ids, b.mask, new)
        assert_generated(got, want, 1 if s.seq2seq else seq, recorder,
                         f"generate({spelling}, {length}: {lengths} {kwarg_lengths} model default "
                         f"{default_lengths}, cache={cache})")

    def greedy_oracle(self, ids, mask, steps, chosen_from=None):
        recorders = []

        def wrap(forward):
            recorders.append(Recorder(forward))
            return recorders[-1]

        extra = {"chosen_from": chosen_from} if chosen_from is not None else {}
        tokens = self.subject.greedy_oracle(ids, mask, steps, wrap=wrap, **extra)
        return tokens, recorders[0]

    @precondition(lambda self: self.generation_allowed() and not self.subject.seq2seq and not self.reused_cache_open())
    @rule(batch=st.integers(1, 3), seq=st.integers(3, 6), seed=st.integers(0, 2**16), new=st.integers(1, 3),
          cut=st.integers(1, 5), deep_copy=st.booleans())
    def generate_reusing_a_prompt_cache(self, batch, seq, seed, new, cut, deep_copy):
        """transformers' prompt reuse: a forward fills a cache for the first tokens, generate() continues from it
        (or from a copy.deepcopy of it) given the whole text. Unpadded: with left padding the forward's positions
        (0, 1, ...) and generate()'s (counted from the first real token) differ in any model, patched or not."""
        s = self.subject
        b = self.batch(batch, seq, "none", seed)
        cut = self._cut_tokens = min(cut, seq - 1)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = s.model(input_ids=b.ids[:, :cut], attention_mask=b.mask[:, :cut], use_cache=True)
            cache = output_cache(first)
            if deep_copy:
                cache = copy.deepcopy(cache)
            if s.patched and s.hoistable and not self.cache_holds_real_tokens_only(cache):
                # the cache starts with the prompt's P virtual tokens and generate() is given the whole sequence: it
                # would slice the new tokens by the cache length, prompt included (README, hoisting): refused
                with pytest.raises(ValueError, match="slices the new tokens by the cache length"):
                    s.model.generate(input_ids=b.ids, attention_mask=b.mask, max_new_tokens=new, do_sample=False,
                                     pad_token_id=s.pad, eos_token_id=s.eos, past_key_values=cache)
                return event("refused: generate() given the whole sequence and a cache that holds the prompt")
            got = s.model.generate(input_ids=b.ids, attention_mask=b.mask, max_new_tokens=new, do_sample=False,
                                   pad_token_id=s.pad, eos_token_id=s.eos, past_key_values=cache,
                                   output_logits=True, return_dict_in_generate=True)
        # a pool's entries were chosen by the forward that filled the cache, from its tokens
        chosen_from = (b.ids[:, :cut], b.mask[:, :cut]) if s.query_selected else None
        want, recorder = self.greedy_oracle(b.ids, b.mask, new, chosen_from=chosen_from)
        assert_generated(got, want, seq, recorder, f"generate() from a reused prompt cache (deepcopy={deep_copy})")

    def cache_holds_real_tokens_only(self, cache):
        """Hoisted forwards fill caches of real tokens only (the prompt's K/V kept beside them); an unhoisted
        forward puts the P virtual tokens first. Told by the cache's length: the oracle needs no fastprompt record."""
        from fastprompt.integrations.cache_compat import cache_length

        return cache_length(cache) == self._cut_tokens

    def peft_forward_prepends_its_prompt(self):
        """PEFT's forward for an input-level prompt puts the P virtual tokens in front of every call's input, a
        decoding step's too (unpatched PEFT: the cache grows by P + 1 per step), so the textbook loop over a
        PeftModel is not the whole-sequence forward, patched or not: PEFT's design, nothing to judge here."""
        s = self.subject
        return s.is_peft and s.method == "prompt"

    @precondition(lambda self: self.generation_allowed() and not self.reused_cache_open()
                  and not self.peft_forward_prepends_its_prompt())
    @rule(batch=st.integers(1, 3), seq=st.integers(2, 6), padding=st.sampled_from(["none", "left"]),
          seed=st.integers(0, 2**16), steps=st.integers(1, 3), name=st.sampled_from(["past_key_values", "cache"]),
          deep_copy=st.booleans())
    def manual_decode(self, batch, seq, padding, seed, steps, name, deep_copy):
        """The textbook loop: out = model(ids, use_cache=True), then model(next_token, past_key_values=the returned
        cache) step by step (optionally a deep copy of it each step). Each step's logits equal the oracle's last
        logits for the whole sequence so far; the next token is the oracle's choice (no tie can split the two)."""
        s = self.subject
        if name not in ("past_key_values", cache_kwarg(s.hf_model.forward)):
            name = "past_key_values"
        b = self.batch(batch, seq, padding, seed)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if s.seq2seq:
                decoder = torch.full((batch, 1), s.decoder_start, dtype=torch.long)
                out = s.model(input_ids=b.ids, attention_mask=b.mask, decoder_input_ids=decoder, use_cache=True)
                want = s.next_logits_oracle(b.ids, b.mask, decoder)
            else:
                tokens, mask = b.ids, b.mask
                out = s.model(input_ids=tokens, attention_mask=mask, use_cache=True)
                want = self.next_logits(tokens, mask, b)
            assert_scale_close(out.logits[:, -1], want, LOGITS_REL, "manual decode, prefill")
            for step in range(steps):
                nxt = want.argmax(-1, keepdim=True)
                cache = output_cache(out)
                if deep_copy:
                    cache = copy.deepcopy(cache)
                if s.seq2seq:
                    decoder = torch.cat([decoder, nxt], 1)
                    out = s.model(input_ids=b.ids, attention_mask=b.mask, decoder_input_ids=nxt, use_cache=True,
                                  **{name: cache})
                    want = s.next_logits_oracle(b.ids, b.mask, decoder)
                else:
                    tokens = torch.cat([tokens, nxt], 1)
                    mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                    out = s.model(input_ids=nxt, attention_mask=mask, use_cache=True, **{name: cache})
                    want = self.next_logits(tokens, mask, b)
                assert_scale_close(out.logits[:, -1], want, LOGITS_REL,
                                   f"manual decode step {step + 1} ({name}=, deepcopy={deep_copy})")

    def next_logits(self, tokens, mask, first):
        s = self.subject
        if s.query_selected:
            return s.next_logits_oracle(tokens, mask, chosen_from=(first.ids, first.mask))
        return s.next_logits_oracle(tokens, mask)

    # ------------------------------------------------------------------------------------------------------------
    # the open-defect areas that need a rule of their own

    @precondition(lambda self: not is_open("threads"))
    @rule(seed=st.integers(0, 2**16))
    def threads(self, seed):
        """Two threads, three no-grad forwards each, on the one patched model: each equals its oracle."""
        s = self.subject
        batches = [self.batch(1 + i % 3, 3 + i % 4, "left", seed + i) for i in range(6)]
        with torch.no_grad():
            wants = [s.call_oracle(b) for b in batches]

        def work(b):
            with torch.no_grad():
                return s.call_patched(b)

        with ThreadPoolExecutor(2) as pool:
            gots = list(pool.map(work, batches))
        for i, (got, want, b) in enumerate(zip(gots, wants, batches)):
            self.compare_outputs(got, want, b, f"thread call {i}")

    @precondition(lambda self: self.subject.hoistable and self.subject.patched and not is_open("train_no_grad_dropout"))
    @rule(seed=st.integers(0, 2**16))
    def dropout_rows_independent_without_grad(self, seed):
        """train() + no_grad with attention dropout: identical rows get independent dropout masks, so the logits at
        the virtual positions differ between rows, as in the unpatched model (one mask per row)."""
        s = self.subject
        hf = s.hf_model
        attentions = [m for m in hf.modules() if hasattr(m, "attention_dropout")]
        before = (hf.config.attention_dropout, [m.attention_dropout for m in attentions], s.training)
        b = self.batch(1, 4, "none", seed)
        ids, mask = b.ids.expand(4, -1), b.mask.expand(4, -1)
        try:
            hf.config.attention_dropout = 0.5
            for m in attentions:
                m.attention_dropout = 0.5
            s.set_training(True)
            with torch.no_grad():
                logits = s.model(input_ids=ids, attention_mask=mask).logits[:, :s.num_virtual]
            spread = float((logits - logits.mean(0)).abs().max())
            assert spread > 0, "identical rows got the same dropout on the virtual tokens (one mask for all rows)"
        finally:
            hf.config.attention_dropout = before[0]
            for m, p in zip(attentions, before[1]):
                m.attention_dropout = p
            s.set_training(before[2])


@pytest.mark.parametrize("kind", SUBJECT_KINDS)
def test_patched_model_matches_its_oracle_through_random_operations(kind):
    machine = type(f"PatchedModelMachine_{kind}", (PatchedModelMachine,), {"KIND": kind})
    run_state_machine_as_test(machine, settings=SETTINGS)


# Hypothesis enables a random subset of the rules in each example (swarm testing), so a few CI examples may leave a
# rule out. This fixed sequence runs every rule, in each state that matters, on every subject (rules whose
# precondition fails in the state reached, open defects included, are left out as the machine would).
EVERY_RULE_ONCE = [
    ("forward", dict(batch=3, seq=5, padding="left", seed=1, grad="enabled")),
    ("forward", dict(batch=2, seq=4, padding="right", seed=2, grad="no_grad")),
    ("forward", dict(batch=1, seq=3, padding="none", seed=3, grad="inference_mode")),
    ("backward_once", dict(batch=3, seq=5, padding="left", seed=4, second=False)),
    ("backward_once", dict(batch=2, seq=4, padding="right", seed=5, second=True)),
    ("backward_twice_retain_graph", dict(batch=2, seq=5, padding="left", seed=6)),
    ("zero_grad", dict(set_to_none=False)),
    ("backward_two_losses_zero_grad_between", dict(batch=3, seq=4, padding="left", seed=7, set_to_none=True)),
    ("set_training", dict(training=True)),
    ("set_checkpointing", dict(mode="non_reentrant")),
    ("backward_once", dict(batch=2, seq=5, padding="left", seed=8, second=False)),
    ("backward_two_losses_zero_grad_between", dict(batch=2, seq=5, padding="left", seed=9, set_to_none=False)),
    ("set_checkpointing", dict(mode="reentrant")),
    ("backward_once", dict(batch=3, seq=4, padding="left", seed=10, second=True)),
    ("backward_twice_retain_graph", dict(batch=2, seq=4, padding="none", seed=11)),
    ("backward_two_losses_zero_grad_between", dict(batch=2, seq=4, padding="left", seed=12, set_to_none=True)),
    ("forward", dict(batch=2, seq=4, padding="left", seed=13, grad="no_grad")),
    ("dropout_rows_independent_without_grad", dict(seed=14)),
    ("set_checkpointing", dict(mode="off")),
    ("set_training", dict(training=False)),
    ("update_weight", dict(index=0, spelling="data", seed=15)),
    ("update_weight", dict(index=1, spelling="no_grad", seed=114)),  # T5: the decoder's relative attention bias
    ("forward", dict(batch=2, seq=4, padding="left", seed=115, grad="no_grad")),
    ("update_weight", dict(index=1, spelling="data", seed=116)),
    # T5: the bias table rebuilt under inference_mode, then a forward with grad that saves it for backward
    ("forward", dict(batch=2, seq=4, padding="left", seed=117, grad="inference_mode")),
    ("backward_once", dict(batch=2, seq=4, padding="left", seed=118, second=False)),
    ("update_weight", dict(index=7, spelling="no_grad", seed=16)),
    ("update_weight", dict(index=3, spelling="replace_data", seed=17)),
    ("update_weight", dict(index=10_000, spelling="no_grad", seed=18)),
    ("forward", dict(batch=3, seq=5, padding="left", seed=19, grad="no_grad")),
    ("generate", dict(batch=3, seq=5, padding="left", seed=20, new=3, spelling="positional", length="max_new_tokens",
                      other_length=1, cache="dynamic")),
    ("generate", dict(batch=2, seq=4, padding="left", seed=21, new=2, spelling="inputs", length="config_max_length",
                      other_length=1, cache="config_static")),
    ("generate", dict(batch=2, seq=6, padding="none", seed=22, new=4, spelling="input_ids", length="both",
                      other_length=1, cache="static")),
    ("generate", dict(batch=3, seq=3, padding="left", seed=23, new=3, spelling="inputs", length="config_both",
                      other_length=8, cache="dynamic")),
    # past Mistral's window (8): P + 3 + 1 fits it, P + 3 + 4 does not
    ("generate", dict(batch=3, seq=3, padding="left", seed=123, new=4, spelling="input_ids",
                      length="config_new_kwarg_length", other_length=1, cache="dynamic")),
    ("generate", dict(batch=2, seq=3, padding="none", seed=124, new=4, spelling="positional",
                      length="default_new_kwarg_length", other_length=1, cache="dynamic")),
    ("generate_reusing_a_prompt_cache", dict(batch=3, seq=5, seed=24, new=2, cut=3, deep_copy=False)),
    ("generate_reusing_a_prompt_cache", dict(batch=2, seq=5, seed=25, new=2, cut=2, deep_copy=True)),
    ("manual_decode", dict(batch=3, seq=4, padding="left", seed=26, steps=3, name="past_key_values",
                           deep_copy=False)),
    ("manual_decode", dict(batch=2, seq=4, padding="none", seed=27, steps=2, name="cache", deep_copy=True)),
    ("threads", dict(seed=28)),
    ("save_and_reload", dict()),
    ("forward", dict(batch=2, seq=4, padding="left", seed=29, grad="enabled")),
    ("set_hoisting", dict(hoist=False)),
    ("forward", dict(batch=3, seq=5, padding="left", seed=30, grad="no_grad")),
    ("backward_once", dict(batch=3, seq=5, padding="left", seed=31, second=False)),
    ("generate", dict(batch=3, seq=5, padding="left", seed=32, new=3, spelling="input_ids", length="max_length",
                      other_length=1, cache="static")),
    ("set_hoisting", dict(hoist=True)),
    ("unpatch", dict()),
    ("forward", dict(batch=3, seq=5, padding="left", seed=33, grad="no_grad")),
    ("backward_once", dict(batch=2, seq=4, padding="left", seed=34, second=False)),
    ("generate", dict(batch=2, seq=4, padding="left", seed=35, new=2, spelling="input_ids", length="max_new_tokens",
                      other_length=1, cache="dynamic")),
    ("save_and_reload", dict()),
    ("patch", dict(hoist=True)),
    ("forward", dict(batch=3, seq=5, padding="left", seed=36, grad="enabled")),
    ("backward_once", dict(batch=3, seq=5, padding="left", seed=37, second=False)),
    ("generate", dict(batch=3, seq=5, padding="left", seed=38, new=3, spelling="positional", length="max_new_tokens",
                      other_length=1, cache="dynamic")),
]


@pytest.mark.parametrize("kind", SUBJECT_KINDS)
def test_every_rule_runs_on_every_subject(kind):
    from hypothesis.stateful import RULE_MARKER

    machine = type(f"PatchedModelMachine_{kind}", (PatchedModelMachine,), {"KIND": kind})()
    machine.build(seed=0)
    ran = set()
    for name, arguments in EVERY_RULE_ONCE:
        preconditions = getattr(getattr(PatchedModelMachine, name), RULE_MARKER).preconditions
        if all(p(machine) for p in preconditions):
            getattr(machine, name)(**arguments)
            ran.add(name)
    rules = {n for n, f in vars(PatchedModelMachine).items() if hasattr(f, RULE_MARKER)}
    # not hoistable (set_hoisting, dropout rows), seq2seq (prompt cache reuse), PEFT input-level prompts (manual
    # decode: PEFT's forward prepends the prompt to every call)
    open_rules = {"dropout_rows_independent_without_grad", "generate_reusing_a_prompt_cache", "manual_decode",
                  "set_hoisting"}
    assert rules - ran <= open_rules, f"rules never run: {sorted(rules - ran)}"
