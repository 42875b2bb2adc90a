"""Task heads and the weighted multi-task loss: the seed's M_t and L = Σ_t α_t · L_t, in one forward over a
mixed-task batch.

    heads = fp.TaskHeads(model.config, {
        "sentiment": fp.SequenceClassificationHead(num_labels=2, pooling="mean"),
        "ner":       fp.TokenClassificationHead(num_labels=5),
        "qa":        fp.SpanExtractionHead(),
    }, loss_weights={"sentiment": 1.0, "ner": 1.0, "qa": 0.5})   # α_t; default 1.0 each
    prompt = fp.MultiTaskPrompt(model, pool_size=8, length=10, heads=heads)   # task id t = t-th name above
    fp.patch_model(model, prompt)                                            # model: a base model (AutoModel)
    out = model(input_ids, attention_mask=mask, task_ids=task_ids,
                labels={"sentiment": y_s, "ner": y_ner, "qa": y_qa})      # each: that task's rows, in batch order
    out.loss                     # Σ_t α_t · L_t over the tasks present in the batch
    out.task_losses["ner"]       # L_t: the mean loss over that task's rows
    out.task_logits["qa"]        # that task's rows only: [n_t, L, 2] (start, end)
    out.task_rows["qa"]          # which rows of the batch those are (LongTensor [n_t])

Heads read the last hidden state of the real tokens (input-level prompt tokens are cut off), so labels and
positions refer to the input as given. Per kind, for the n_t rows of task t (L = the padded input length):

- SequenceClassificationHead(num_labels, pooling="cls" | "mean" | "last"): logits [n_t, C] from the first real
  token ("cls"), the masked mean, or the last real token (causal LMs); labels LongTensor [n_t], -100 = no label.
  L_t = cross-entropy averaged over the labelled rows.
- TokenClassificationHead(num_labels): logits [n_t, L, C]; labels [n_t, L], -100 = no label (padding is never
  counted). L_t = cross-entropy averaged over the labelled tokens of the task's rows (transformers' convention).
- SpanExtractionHead(): logits [n_t, L, 2], start and end scores, padding masked to the dtype's minimum; labels
  [n_t, 2] = (start, end) positions of real tokens (a position on padding is refused), -100 = no answer. L_t = (CE(start) + CE(end)) / 2 over the labelled
  rows (transformers' QA convention).

Rows of other tasks never enter a task's head or loss, so each row gives what its task's rows give when run
alone (logits, loss terms, gradients). Heads and α are saved with the prompt: the weights in the safetensors
file, the head kinds, names and α in the JSON config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import model_dims

IGNORE_INDEX = -100
POOLINGS = ("cls", "mean", "last")

__all__ = ["SequenceClassificationHead", "TokenClassificationHead", "SpanExtractionHead", "TaskHeads",
           "TaskHeadsOutput", "head_spec_from_dict", "attach_head_outputs"]


# ---- what each task's head is (plain data: it goes into the JSON config) ---------------------------------------


@dataclass(frozen=True)
class SequenceClassificationHead:
    """One label per row from a pooled hidden state: sentiment, topic, NLI."""

    num_labels: int
    pooling: str = "cls"
    kind = "sequence"

    def __post_init__(self):
        _check_num_labels(self.num_labels)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def out_features(self) -> int:
        return self.num_labels


@dataclass(frozen=True)
class TokenClassificationHead:
    """One label per token: NER, POS tagging."""

    num_labels: int
    kind = "token"

    def __post_init__(self):
        _check_num_labels(self.num_labels)

    def out_features(self) -> int:
        return self.num_labels


@dataclass(frozen=True)
class SpanExtractionHead:
    """A (start, end) span of the input: extractive question answering."""

    kind = "span"

    def out_features(self) -> int:
        return 2


HeadSpec = Union[SequenceClassificationHead, TokenClassificationHead, SpanExtractionHead]
_KINDS = {cls.kind: cls for cls in (SequenceClassificationHead, TokenClassificationHead, SpanExtractionHead)}


def _check_num_labels(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_labels must be a positive int, got {n!r}")


def head_spec_to_dict(name: str, spec: HeadSpec) -> Dict[str, Any]:
    return {"name": name, "kind": spec.kind, **dataclasses.asdict(spec)}


def head_spec_from_dict(data: Mapping[str, Any]) -> Tuple[str, HeadSpec]:
    data = dict(data)
    name, kind = data.pop("name"), data.pop("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown head kind {kind!r}; known: {sorted(_KINDS)}")
    return name, _KINDS[kind](**data)


# ---- the module ------------------------------------------------------------------------------------------------


@dataclass
class TaskHeadsOutput:
    loss: Optional[Tensor]  # Σ_t α_t · L_t over the tasks present (None without labels)
    task_losses: Dict[str, Tensor]  # L_t
    task_logits: Dict[str, Tensor]  # that task's rows only
    task_rows: Dict[str, Tensor]  # their row indices in the batch


class TaskHeads(nn.Module):
    """Per-task output layers M_t (one nn.Linear each) and the task weights α_t.

    `TaskHeads(model_or_config_or_hidden_size, {name: head spec, ...}, loss_weights=None)`: task id t is the t-th
    name. `loss_weights`: a {name: α} mapping (missing names get 1.0) or a sequence in task order.
    Call: `heads(hidden [B, L, d], attention_mask [B, L] | None, task_ids [B], labels {name: tensor} | None)`.
    """

    def __init__(self, model_or_hidden, heads: Mapping[str, HeadSpec],
                 loss_weights: Union[Mapping[str, float], Sequence[float], None] = None):
        super().__init__()
        hidden = model_or_hidden if isinstance(model_or_hidden, int) else _hidden_size(model_or_hidden)
        if not isinstance(heads, Mapping) or not heads:
            raise ValueError("heads must be a non-empty {task name: head spec} mapping")
        for name, spec in heads.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"task names must be identifiers (they name parameters), got {name!r}")
            if not isinstance(spec, tuple(_KINDS.values())):
                raise TypeError(f"heads[{name!r}] must be a SequenceClassificationHead, TokenClassificationHead "
                                f"or SpanExtractionHead, got {type(spec).__name__}")
        self.hidden_size = int(hidden)
        self.names: Tuple[str, ...] = tuple(heads)
        self.specs: Dict[str, HeadSpec] = dict(heads)
        self.loss_weights: Tuple[float, ...] = _weights_in_order(self.names, loss_weights)
        self.layers = nn.ModuleDict({name: nn.Linear(self.hidden_size, spec.out_features())
                                     for name, spec in heads.items()})

    # ---- persistence: the JSON side (weights go with the prompt's state_dict) ---------------------------------
    def spec_dicts(self) -> Tuple[Dict[str, Any], ...]:
        return tuple(head_spec_to_dict(n, self.specs[n]) for n in self.names)

    @classmethod
    def from_spec_dicts(cls, hidden_size: int, specs, loss_weights) -> "TaskHeads":
        pairs = [head_spec_from_dict(d) for d in specs]
        return cls(hidden_size, dict(pairs), loss_weights=None if loss_weights is None else tuple(loss_weights))

    def __len__(self) -> int:
        return len(self.names)

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{n}: {self.specs[n].kind} α={a:g}" for n, a in zip(self.names, self.loss_weights))
        return f"tasks=({kinds})"

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor], task_ids: Tensor,
                labels: Optional[Mapping[str, Tensor]] = None) -> TaskHeadsOutput:
        batch, length = hidden.shape[:2]
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"task heads are {self.hidden_size} wide, the hidden states are {hidden.shape[-1]}")
        mask = (torch.ones(batch, length, dtype=torch.bool, device=hidden.device) if attention_mask is None
                else attention_mask.to(device=hidden.device, dtype=torch.bool))
        if mask.shape != (batch, length):
            raise ValueError(f"attention_mask must be [B, L] = {(batch, length)}, got {tuple(mask.shape)}")
        labels = self._check_labels(labels, task_ids, length, mask)
        losses, logits_by_task, rows_by_task = {}, {}, {}
        for t, name in enumerate(self.names):
            rows = torch.nonzero(task_ids == t).flatten()
            if rows.numel() == 0:
                continue
            logits, loss = self._task_forward(name, hidden[rows], mask[rows], None if labels is None else
                                              labels[name])
            logits_by_task[name], rows_by_task[name] = logits, rows
            if loss is not None:
                losses[name] = loss
        total = None
        if labels is not None:
            weights = dict(zip(self.names, self.loss_weights))
            total = sum(weights[name] * loss for name, loss in losses.items())
        return TaskHeadsOutput(total, losses, logits_by_task, rows_by_task)

    def _task_forward(self, name: str, hidden: Tensor, mask: Tensor, labels: Optional[Tensor]):
        spec, layer = self.specs[name], self.layers[name]
        hidden = hidden.to(layer.weight.dtype)
        if spec.kind == "sequence":
            logits = layer(_pool(hidden, mask, spec.pooling))  # [n, C]
            loss = None if labels is None else _mean_ce(logits, labels)
            return logits, loss
        if spec.kind == "token":
            logits = layer(hidden)  # [n, L, C]
            if labels is None:
                return logits, None
            labels = labels.masked_fill(~mask, IGNORE_INDEX)  # padding never counts
            return logits, _mean_ce(logits.flatten(0, 1), labels.flatten())
        logits = layer(hidden).masked_fill(~mask[..., None], torch.finfo(layer.weight.dtype).min)  # [n, L, 2]
        if labels is None:
            return logits, None
        start = _mean_ce(logits[..., 0], labels[:, 0])
        end = _mean_ce(logits[..., 1], labels[:, 1])
        return logits, (start + end) / 2

    def _check_labels(self, labels, task_ids: Tensor, length: int,
                      mask: Tensor) -> Optional[Dict[str, Tensor]]:
        if labels is None:
            return None
        if not isinstance(labels, Mapping):
            raise TypeError("with task heads, labels must be a {task name: labels of that task's rows} dict, got "
                            f"{type(labels).__name__}")
        unknown = sorted(set(labels) - set(self.names))
        if unknown:
            raise ValueError(f"labels has unknown tasks {unknown}; the heads are {list(self.names)}")
        out = {}
        for t, name in enumerate(self.names):
            count = int((task_ids == t).sum())
            if name not in labels or labels[name] is None:
                if count:
                    raise ValueError(f"labels has no entry for task {name!r}, which has {count} rows in this batch")
                continue
            y = torch.as_tensor(labels[name], device=task_ids.device)
            if y.dtype.is_floating_point or y.dtype == torch.bool:
                raise TypeError(f"labels[{name!r}] must be an integer tensor, got dtype {y.dtype}")
            kind = self.specs[name].kind
            want = {"sequence": (count,), "token": (count, length), "span": (count, 2)}[kind]
            if tuple(y.shape) != want:
                what = {"sequence": "[n_t]", "token": "[n_t, L]", "span": "[n_t, 2] (start, end)"}[kind]
                raise ValueError(f"labels[{name!r}] must be {what} = {want} for the {count} rows of task {name!r} "
                                 f"(in batch order), got {tuple(y.shape)}")
            limit = length if kind == "span" else self.specs[name].num_labels
            bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= limit))
            if bool(bad.any()):
                what = "token positions in [0, L)" if kind == "span" else f"class ids in [0, {limit})"
                raise ValueError(f"labels[{name!r}] must hold {what} or -100, got {int(y[bad][0])}")
            if kind == "span":
                _check_spans_on_real_tokens(name, y, mask[torch.nonzero(task_ids == t).flatten()])
            out[name] = y.long()
        return out


def _check_spans_on_real_tokens(name: str, spans: Tensor, mask: Tensor) -> None:
    """A span boundary must be a real token: the head masks padding to the dtype's minimum (so that no prediction
    lands there), which makes a label on padding an impossible target with a loss of about 1e38 or inf. transformers'
    QA heads score padding like any token and ignore only positions outside the input (clamped to L); this head
    cannot score such a label at all, so, like a position outside [0, L), it is refused, never trained on."""
    labelled = spans != IGNORE_INDEX
    on_padding = labelled & ~mask.to(spans.device).gather(1, spans.clamp(min=0).long())
    if bool(on_padding.any()):
        row, side = (int(i) for i in torch.nonzero(on_padding)[0])
        raise ValueError(
            f"labels[{name!r}] row {row} (of task {name!r}'s rows, in batch order) has its "
            f"{('start', 'end')[side]} position {int(spans[row, side])} on padding (attention_mask is 0 there); "
            "span positions must point at real tokens, or be -100 for no answer")


def _pool(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    real = mask.to(torch.long)
    if pooling == "cls":  # the first real token (right or left padding)
        return hidden[rows, torch.argmax(real, dim=1)]
    last = mask.shape[1] - 1 - torch.argmax(real.flip(1), dim=1)
    return hidden[rows, last]


def _mean_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over the labelled entries (0, with a gradient path, when none is labelled)."""
    per_entry = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    count = (labels != IGNORE_INDEX).sum().clamp_min(1)
    return per_entry.sum() / count


def _weights_in_order(names, loss_weights) -> Tuple[float, ...]:
    if loss_weights is None:
        return tuple(1.0 for _ in names)
    if isinstance(loss_weights, Mapping):
        unknown = sorted(set(loss_weights) - set(names))
        if unknown:
            raise ValueError(f"loss_weights has unknown tasks {unknown}; the heads are {list(names)}")
        weights = tuple(float(loss_weights.get(n, 1.0)) for n in names)
    else:
        weights = tuple(float(w) for w in loss_weights)
        if len(weights) != len(names):
            raise ValueError(f"loss_weights has {len(weights)} entries for {len(names)} tasks")
    if any(not w >= 0 for w in weights):
        raise ValueError(f"loss_weights must be >= 0, got {weights}")
    return weights


def _hidden_size(model_or_config) -> int:
    return model_dims(model_or_config)["hidden_size"]


# ---- the integration's hook: heads on a patched model's output -------------------------------------------------


def attach_head_outputs(prompt, out, attention_mask: Optional[Tensor], task_ids: Tensor, labels):
    """Run `prompt.heads` on the real tokens' last hidden state of `out` and add loss / task_losses / task_logits /
    task_rows to it (called by fastprompt.integrations.prompt_attach on the prefill step)."""
    hidden = out.get("last_hidden_state") if hasattr(out, "get") else None
    if hidden is None:
        raise TypeError(
            "task heads read last_hidden_state: patch a base model (transformers.AutoModel, e.g. BertModel or "
            "LlamaModel), not a model that already has its own head (AutoModelFor...)")
    offset = prompt.num_input_tokens() if prompt.placement == "input" else 0
    result = prompt.heads(hidden[:, offset:], attention_mask, task_ids, labels)
    if result.loss is not None:
        out["loss"] = result.loss
    out["task_losses"] = result.task_losses
    out["task_logits"] = result.task_logits
    out["task_rows"] = result.task_rows
    return out
