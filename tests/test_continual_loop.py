"""fastprompt.continual, the class-incremental loop helper: the metrics against a hand-computed accuracy matrix, the
logit masking, the task switch of the prompt (CodaPrompt's next_task, DualPrompt's task_ids in training only)."""

import pytest
import torch
from torch import nn

import fastprompt as fp
from fastprompt.continual import (TaskSequence, average_accuracy, begin_task, forgetting, mask_logits,
                                  train_continual)
from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from vision_helpers import pixels, tiny_vision_model

# accuracy[t][j] after task t on task j
MATRIX = [[0.9],
          [0.7, 0.8],
          [0.6, 0.5, 0.95]]


def test_average_accuracy_and_forgetting_by_hand():
    assert average_accuracy(MATRIX) == pytest.approx((0.6 + 0.5 + 0.95) / 3)
    # task 0: best 0.9 (after task 0), final 0.6 -> 0.3; task 1: best 0.8, final 0.5 -> 0.3
    assert forgetting(MATRIX) == pytest.approx((0.3 + 0.3) / 2)
    # the best is over every evaluation before the last, not only the first
    assert forgetting([[0.5], [0.9, 0.7], [0.4, 0.7, 1.0]]) == pytest.approx(((0.9 - 0.4) + 0.0) / 2)
    assert forgetting([[0.8]]) == 0.0 and average_accuracy([[0.8]]) == pytest.approx(0.8)


def test_task_sequence():
    tasks = TaskSequence.split(10, 5)
    assert tasks.classes == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)) and len(tasks) == 5
    assert tasks.seen(1) == (0, 1, 2, 3)
    assert TaskSequence.split(4, 2, order=[3, 1, 0, 2]).classes == ((3, 1), (0, 2))
    labels = torch.tensor([0, 3, 2, 9, 1])
    assert tasks.rows_of(labels, 1).tolist() == [1, 2]
    with pytest.raises(ValueError, match="evenly"):
        TaskSequence.split(10, 3)
    with pytest.raises(ValueError, match="permutation"):
        TaskSequence.split(4, 2, order=[0, 0, 1, 2])


def test_masked_classes_get_no_probability_and_no_gradient():
    logits = torch.randn(3, 6, requires_grad=True)
    masked = mask_logits(logits, (2, 4))
    assert torch.isinf(masked[:, [0, 1, 3, 5]]).all() and torch.equal(masked[:, [2, 4]], logits[:, [2, 4]])
    nn.functional.cross_entropy(masked, torch.tensor([2, 4, 2])).backward()
    assert (logits.grad[:, [0, 1, 3, 5]] == 0).all() and (logits.grad[:, [2, 4]] != 0).all()


def _linear_data(n=40, classes=4, dim=6):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(n, dim, generator=g) + 3 * nn.functional.one_hot(y, dim).float()
    return x, y


def test_training_a_task_leaves_the_head_rows_of_other_classes_alone():
    torch.manual_seed(0)
    head = nn.Linear(6, 4)
    before = head.weight.detach().clone()
    x, y = _linear_data()
    tasks = TaskSequence.split(4, 2)
    sgd = lambda params: torch.optim.SGD(params, lr=0.5)  # noqa: E731
    result = train_continual(head, TaskSequence((tasks.classes[0],)), (x, y), (x, y), epochs=3, batch_size=8,
                             forward=lambda m, inp, task_ids: m(inp), make_optimizer=sgd)
    assert torch.equal(head.weight[2:], before[2:])  # classes 2, 3 masked: untouched
    assert not torch.equal(head.weight[:2], before[:2])
    assert len(result.accuracy) == 1 and result.accuracy[0][0] > 0.9
    result = train_continual(head, tasks, (x, y), (x, y), epochs=3, batch_size=8,
                             forward=lambda m, inp, task_ids: m(inp), make_optimizer=sgd)
    assert [len(row) for row in result.accuracy] == [1, 2]
    assert result.average_accuracy == pytest.approx(sum(result.accuracy[-1]) / 2)


def test_begin_task_moves_coda_and_refuses_going_back():
    model = tiny_vision_model("vit", "cls", layers=2)
    coda = fp.CodaPrompt(model, pool_size=6, num_tasks=3, length=2, layers=(0, 1))
    begin_task(coda, 0)
    assert coda.task == 0
    begin_task(coda, 2)
    assert coda.task == 2
    with pytest.raises(ValueError, match="past task"):
        begin_task(coda, 1)
    begin_task(None, 3)  # a head alone: nothing to move


@pytest.mark.parametrize("kind", ["coda", "dual"])
def test_the_loop_switches_the_prompt_task_and_passes_task_ids_in_training_only(kind):
    model = tiny_vision_model("vit", "cls", layers=2)
    if kind == "coda":
        prompt = fp.CodaPrompt(model, pool_size=4, num_tasks=2, length=2, layers=(0, 1))
    else:
        prompt = fp.DualPrompt(model, g_length=1, g_layers=(0,), e_length=1, e_layers=(1,), pool_size=2)
    fp.patch_model(model, prompt)
    model.classifier.requires_grad_(True)
    calls = []

    def forward(m, x, task_ids):
        calls.append((m.training, None if task_ids is None else task_ids.tolist(), getattr(prompt, "task", None)))
        return m(pixel_values=x, **({} if task_ids is None else {"task_ids": task_ids})).logits

    x = pixels(8)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    tasks = TaskSequence.split(4, 2)
    result = train_continual(model, tasks, (x, y), (x, y), prompt=prompt, batch_size=4, forward=forward)
    training = [c for c in calls if c[0]]
    evaluating = [c for c in calls if not c[0]]
    assert training and evaluating and all(c[1] is None for c in evaluating)
    if kind == "dual":  # the current task's E-prompt in training
        assert [c[1] for c in training] == [[0] * 4, [1] * 4]
    else:  # next_task() before task 1: its training runs on slice 1
        assert all(c[1] is None for c in training) and [c[2] for c in training] == [0, 1]
        assert prompt.task == 1
    assert [len(row) for row in result.accuracy] == [1, 2]
