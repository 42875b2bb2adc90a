"""Token classification and extractive QA with fastprompt's own input-level prompts: outputs at real tokens only.

An input-level prompt makes the model see `[prompt; tokens]`, so a token-classification or QA head scores P virtual
positions too. `prompt_attach` keeps those scores away from the caller:
- token classification: logits `[B, S, C]` at the real tokens; labels `[B, S]` are padded with -100 before the call
  (the model's loss then counts real tokens only, the same number as on the returned logits);
- extractive QA: start/end logits `[B, S]` at the real tokens; `start_positions` / `end_positions` index the caller's
  tokens and the loss is the model family's QA loss (clamp to [0, S], ignore S, mean of start and end
  cross-entropy) on those logits, so a virtual position can never be predicted as an answer boundary.
PEFT's own input-level forward differs (it returns P+S positions and passes span positions unshifted); `patch_model`
on a PeftModel keeps PEFT's behaviour, this applies to fastprompt's prompt modules only.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from transformers.loss.loss_utils import ForQuestionAnsweringLoss

__all__ = ["per_token_task", "take_span_targets", "real_token_outputs"]

_SPAN_KEYS = ("start_positions", "end_positions")


def per_token_task(model) -> Optional[str]:
    """"TOKEN_CLS" / "QUESTION_ANS" for a transformers token-classification / QA model, else None."""
    name = type(model).__name__
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    return None


def take_span_targets(kw: Dict[str, Any]) -> Dict[str, Any]:
    """Remove QA span targets from the model call (the loss is computed on real-token logits afterwards)."""
    return {key: kw.pop(key) for key in _SPAN_KEYS if key in kw}


def real_token_outputs(task: str, out, num_prompt_tokens: int, spans: Dict[str, Any]):
    """The model's output with per-token fields cut to the real tokens (and the QA loss on them)."""
    values = {key: out.get(key) for key in out.__dataclass_fields__}
    if task == "TOKEN_CLS":
        values["logits"] = out.logits[:, num_prompt_tokens:]
    else:
        values["start_logits"] = out.start_logits[:, num_prompt_tokens:].contiguous()
        values["end_logits"] = out.end_logits[:, num_prompt_tokens:].contiguous()
        start, end = spans.get("start_positions"), spans.get("end_positions")
        if start is not None and end is not None:
            values["loss"] = ForQuestionAnsweringLoss(values["start_logits"], values["end_logits"], start, end)
    return type(out)(**values)
