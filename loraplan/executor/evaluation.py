"""The eval loss a finished run reports: the Trainer's own evaluation at the last step when it made one (eval
every `save_steps`: the last step is often one of them), else one evaluation now. Evaluating again would log a
second eval row for the same step into metrics.jsonl."""

from __future__ import annotations

from typing import Optional


def final_eval_loss(trainer) -> Optional[float]:
    state = trainer.state
    for entry in reversed(state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == state.global_step:
                return entry["eval_loss"]
            break
    return trainer.evaluate().get("eval_loss")
