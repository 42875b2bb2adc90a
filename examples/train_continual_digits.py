"""Class-incremental learning on scikit-learn's digits (8x8 images, 10 classes, 5 tasks of 2 classes) with a
small Vision Transformer on the CPU: a linear head alone vs L2P, DualPrompt and CODA-Prompt (the exact two-pass
query) and DualPrompt / CODA-Prompt with OS-Prompt's one-stage query; average accuracy and forgetting.

The backbone (a Hugging Face ViTForImageClassification built from a config: 8x8 images, 2x2 patches, 6 layers,
hidden 64) is pretrained inside the example, then frozen: PRETRAIN_SHARE of the images of each class are set aside
for it and never used again; the continual tasks' train and test images are the other ones. It learns there to
classify the 10 digits (supervised, as the reference implementations' backbones were trained on labelled ImageNet):
the continual tasks' images, their test images included, are not among those it saw. (A self-supervised objective,
predicting which of 4 rotations an image was given, left features too weak for any method here: every average
accuracy stayed under 0.25, the last task's classes taking every prediction.) Each method then trains its prompt and the classifier head through the task sequence with
fastprompt.continual (the logits of classes outside the current task masked, evaluation after every task over the
classes seen so far).

    python examples/train_continual_digits.py [--epochs 5] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers
from sklearn.datasets import load_digits
from torch.nn import functional as F

import fastprompt as fp
from fastprompt.continual import TaskSequence, train_continual

PRETRAIN_SHARE = 0.3
PRETRAIN_OBJECTIVE = "supervised, the 10 digit classes"


def load_data(seed: int = 0):
    """(pretraining images, continual train (x, y), continual test (x, y)): disjoint, split per class."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [n, 1, 8, 8] in [0, 1]
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    parts = {"pretrain": [], "train": [], "test": []}
    for c in range(10):
        rows = torch.nonzero(y == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        a = int(PRETRAIN_SHARE * len(rows))
        b = a + int(0.7 * (len(rows) - a))
        parts["pretrain"].append(rows[:a])
        parts["train"].append(rows[a:b])
        parts["test"].append(rows[b:])
    pick = {k: torch.cat(v) for k, v in parts.items()}
    return (x[pick["pretrain"]], y[pick["pretrain"]]), (x[pick["train"]], y[pick["train"]]), \
        (x[pick["test"]], y[pick["test"]])


def make_vit(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=6,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(config)


def pretrain(model, images, labels, epochs: int, seed: int = 0) -> float:
    """Train the whole ViT to classify the pretraining split; returns its accuracy there."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=g).split(64):
            loss = F.cross_entropy(model(pixel_values=images[batch]).logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return float((model(pixel_values=images).logits.argmax(-1) == labels).float().mean())


METHODS = {
    "linear head": None,
    "L2P": lambda m: fp.PromptPool(m, pool_size=10, length=5, top_k=5, query="cls", pull_reduction="l2p",
                                   pull_constraint_coeff=0.1, init_std=0.5),
    "DualPrompt": lambda m: fp.DualPrompt(m, g_length=5, g_layers=(0, 1), e_length=5, e_layers=(2, 3, 4),
                                          pool_size=5),
    "CODA-Prompt": lambda m: fp.CodaPrompt(m, pool_size=50, length=8, layers=(0, 1, 2, 3, 4), num_tasks=5,
                                           ortho_mu=0.0),
    "DualPrompt one-stage": lambda m: fp.DualPrompt(m, g_length=5, g_layers=(0, 1), e_length=5, e_layers=(2, 3, 4),
                                                    pool_size=5, query_pass="one_stage"),
    "CODA-Prompt one-stage": lambda m: fp.CodaPrompt(m, pool_size=50, length=8, layers=(0, 1, 2, 3, 4), num_tasks=5,
                                                     ortho_mu=0.0, query_pass="one_stage"),
}


def run_method(name, backbone, tasks, train, test, epochs, lr, seed, max_steps=None):
    model = copy.deepcopy(backbone)
    make = METHODS[name]
    prompt = None
    if make is None:
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        prompt = make(model)
        fp.patch_model(model, prompt)  # freezes the backbone
    torch.manual_seed(seed)  # the same fresh head for every method (the pretraining head is not kept)
    model.classifier.reset_parameters()
    model.classifier.requires_grad_(True)
    start = time.perf_counter()
    result = train_continual(model, tasks, train, test, prompt=prompt, epochs=epochs, batch_size=16,
                             make_optimizer=lambda params: torch.optim.Adam(params, lr=lr), seed=seed,
                             max_steps_per_task=max_steps)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3,
                        help="runs to average (each: its own data split, backbone, pretraining and heads)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per task")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 seed, 1 pretraining epoch, 2 steps per task, a tenth of the test images")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the results and the run's settings there (the README's table comes from "
                             "benchmarks/results/example_continual_digits.json)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.pretrain_epochs = 1, 1
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tasks = TaskSequence.split(10, 5)
    runs = {name: [] for name in METHODS}
    pretrained = []
    for seed in range(args.seeds):
        (pre_x, pre_y), train, test = load_data(seed)
        if args.quick:
            test = (test[0][::10], test[1][::10])
        backbone = make_vit(seed)
        began = time.perf_counter()
        pretrained.append(pretrain(backbone, pre_x, pre_y, args.pretrain_epochs, seed))
        print(f"seed {seed}: ViT 8x8 / 2x2 patches, {backbone.config.num_hidden_layers} layers, hidden "
              f"{backbone.config.hidden_size}, pretrained ({PRETRAIN_OBJECTIVE}) on {len(pre_x)} held-out images "
              f"(accuracy there {pretrained[-1]:.2f}, {time.perf_counter() - began:.0f} s); continual: {len(tasks)} "
              f"tasks of 2 classes, {len(train[0])} train / {len(test[0])} test images", flush=True)
        for name in METHODS:
            result, seconds = run_method(name, backbone, tasks, train, test, args.epochs, args.lr, seed,
                                         max_steps=2 if args.quick else None)
            runs[name].append({"average_accuracy": result.average_accuracy, "forgetting": result.forgetting,
                               "accuracy": result.accuracy, "train_s": seconds})
            print(f"  {name:22s} average accuracy {result.average_accuracy:.3f}  forgetting "
                  f"{result.forgetting:.3f}  ({seconds:.0f} s)", flush=True)
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    results = {name: {"average_accuracy": mean(rows, "average_accuracy"), "forgetting": mean(rows, "forgetting"),
                      "train_s": mean(rows, "train_s"), "seeds": rows} for name, rows in runs.items()}
    print(f"mean of {args.seeds} seed{'s' if args.seeds > 1 else ''}:")
    for name, r in results.items():
        print(f"  {name:22s} average accuracy {r['average_accuracy']:.3f}  forgetting {r['forgetting']:.3f}")
    total = time.perf_counter() - start
    print(f"total {total:.0f} s")
    if args.json:
        from example_results import write_results

        write_results(args.json, "examples/train_continual_digits.py", vars(args), results,
                      pretrain={"objective": PRETRAIN_OBJECTIVE, "share": PRETRAIN_SHARE, "images": len(pre_x),
                                "epochs": args.pretrain_epochs, "accuracy": pretrained},
                      total_s=total)


if __name__ == "__main__":
    main()
