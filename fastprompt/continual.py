"""A small class-incremental learning loop, as L2P / DualPrompt / CODA-Prompt train and report.

- A `TaskSequence` splits the classes into tasks (`TaskSequence.split(10, 5)`: classes 0-1, 2-3, ...).
- Training on task t masks the logits of every class outside task t (`mask_logits`: set to -inf, so those classes
  get no gradient and the head's rows of earlier tasks are left alone), as the reference implementations do.
- Before task t the prompt moves to task t (`begin_task`: CodaPrompt's `next_task()` freezes the earlier slices
  and starts a new one); during training the current task id goes to the model as `task_ids=` when the prompt takes
  it (DualPrompt's E-prompt, PromptPool(task_entries=True)); at evaluation no task id is given (the keys choose).
- After each task, every task seen so far is evaluated, its logits restricted to the classes seen so far
  (CODA-Prompt's evaluation): `accuracy[t][j]` = accuracy on task j's test set after training task t.
- `average_accuracy` (after the last task, the mean over tasks of the accuracy on each) and `forgetting` (the mean
  over the tasks before the last of the drop from their best accuracy after any earlier task to their final
  accuracy) are the standard definitions (Chaudhry et al. 2018; L2P, DualPrompt and CODA-Prompt report them).

The prompt's auxiliary loss (key-pull, orthogonality) is added to the masked cross-entropy. The optimizer is made
anew for each task over the parameters that are trainable then (CodaPrompt's frozen slices are not), as the
reference implementations do. The model is any module; `forward(model, x, task_ids)` returns logits (by default a
Hugging Face image classifier called with `pixel_values`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["TaskSequence", "ContinualResult", "mask_logits", "begin_task", "average_accuracy", "forgetting",
           "train_continual"]


@dataclass(frozen=True)
class TaskSequence:
    """The classes of each task, in training order."""

    classes: Tuple[Tuple[int, ...], ...]

    @classmethod
    def split(cls, num_classes: int, num_tasks: int, order: Optional[Sequence[int]] = None) -> "TaskSequence":
        """`num_tasks` tasks of num_classes / num_tasks classes each, in `order` (default 0, 1, 2, ...)."""
        order = list(range(num_classes)) if order is None else [int(c) for c in order]
        if sorted(order) != list(range(num_classes)):
            raise ValueError(f"order must be a permutation of 0..{num_classes - 1}, got {order}")
        if num_tasks < 1 or num_classes % num_tasks:
            raise ValueError(f"num_classes ({num_classes}) must split evenly into num_tasks ({num_tasks})")
        per = num_classes // num_tasks
        return cls(tuple(tuple(order[t * per:(t + 1) * per]) for t in range(num_tasks)))

    def __len__(self) -> int:
        return len(self.classes)

    def seen(self, task: int) -> Tuple[int, ...]:
        """The classes of tasks 0..task."""
        return tuple(c for t in range(task + 1) for c in self.classes[t])

    def rows_of(self, labels: Tensor, task: int) -> Tensor:
        """[n] indices of the rows whose label is one of task `task`'s classes."""
        wanted = torch.tensor(self.classes[task], device=labels.device)
        return torch.nonzero(torch.isin(labels, wanted)).flatten()


def mask_logits(logits: Tensor, classes: Sequence[int]) -> Tensor:
    """The logits with every class not in `classes` set to -inf (no probability, no gradient)."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[list(classes)] = True
    return logits.masked_fill(~keep, float("-inf"))


def begin_task(prompt, task: int) -> None:
    """Move the prompt (or each member of a PromptStack) with per-task state to `task`: CodaPrompt's next_task()
    until its task is `task`. Prompts that take the task as `task_ids=` (DualPrompt) have no state to move."""
    if prompt is None:
        return
    for module in prompt.modules():
        if hasattr(module, "next_task"):
            if module.task > task:
                raise ValueError(f"{type(module).__name__} is at task {module.task}, past task {task}")
            while module.task < task:
                module.next_task()


def average_accuracy(accuracy: Sequence[Sequence[float]]) -> float:
    """Mean over tasks j of accuracy[T-1][j], the accuracy on task j after the last task."""
    last = accuracy[-1]
    return sum(last[: len(accuracy)]) / len(accuracy)


def forgetting(accuracy: Sequence[Sequence[float]]) -> float:
    """Mean over tasks j < T-1 of max_{j <= l < T-1} accuracy[l][j] - accuracy[T-1][j] (0 for one task)."""
    T = len(accuracy)
    if T < 2:
        return 0.0
    drops = [max(accuracy[l][j] for l in range(j, T - 1)) - accuracy[T - 1][j] for j in range(T - 1)]
    return sum(drops) / len(drops)


@dataclass
class ContinualResult:
    """accuracy[t][j]: accuracy on task j's test set after training task t (j <= t)."""

    accuracy: List[List[float]] = field(default_factory=list)

    @property
    def average_accuracy(self) -> float:
        return average_accuracy(self.accuracy)

    @property
    def forgetting(self) -> float:
        return forgetting(self.accuracy)


def hf_image_logits(model, x: Tensor, task_ids: Optional[Tensor]) -> Tensor:
    """The default forward: a (patched) Hugging Face image classifier."""
    extra = {} if task_ids is None else {"task_ids": task_ids}
    return model(pixel_values=x, **extra).logits


def _accuracy(model, forward, x: Tensor, y: Tensor, classes: Sequence[int], batch_size: int) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = mask_logits(forward(model, x[i:i + batch_size], None), classes)
            correct += int((logits.argmax(-1) == y[i:i + batch_size]).sum())
    return correct / max(len(x), 1)


def train_continual(model, tasks: TaskSequence, train: Tuple[Tensor, Tensor], test: Tuple[Tensor, Tensor], *,
                    prompt=None, epochs: int = 1, batch_size: int = 32,
                    make_optimizer: Callable = lambda params: torch.optim.Adam(params, lr=1e-3),
                    forward: Callable = hf_image_logits, seed: int = 0,
                    max_steps_per_task: Optional[int] = None) -> ContinualResult:
    """Train `model` on the tasks in order and evaluate after each; returns the accuracy matrix.

    train / test: (inputs [n, ...], labels [n]) over all classes; each task takes its classes' rows.
    prompt: the fastprompt prompt attached to `model` (None for a head alone): moved to each task, its task id
    passed in training when it takes one, its auxiliary loss added."""
    generator = torch.Generator().manual_seed(seed)
    takes_task_ids = bool(getattr(prompt, "accepts_task_ids", False))
    result = ContinualResult()
    for t in range(len(tasks)):
        begin_task(prompt, t)
        rows = tasks.rows_of(train[1], t)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        model.train()
        steps = 0
        for _ in range(epochs):
            for batch in rows[torch.randperm(len(rows), generator=generator)].split(batch_size):
                x, y = train[0][batch], train[1][batch]
                task_ids = torch.full((len(batch),), t, dtype=torch.long) if takes_task_ids else None
                logits = forward(model, x, task_ids)
                loss = F.cross_entropy(mask_logits(logits, tasks.classes[t]), y)
                aux = getattr(prompt, "aux_loss", None)
                if aux is not None and getattr(prompt.config, "add_aux_loss", True):
                    loss = loss + aux
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
                if max_steps_per_task is not None and steps >= max_steps_per_task:
                    break
            if max_steps_per_task is not None and steps >= max_steps_per_task:
                break
        model.eval()
        seen = tasks.seen(t)
        row = []
        for j in range(t + 1):
            test_rows = tasks.rows_of(test[1], j)
            row.append(_accuracy(model, forward, test[0][test_rows], test[1][test_rows], seen, batch_size))
        result.accuracy.append(row)
    return result
