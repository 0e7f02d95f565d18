"""loraplan: plan and run LoRA / QLoRA fine-tuning.

    import loraplan
    result = loraplan.plan("llama-3.1-8b", gpu="rtx-4090")   # arithmetic: no torch
    summary = loraplan.run(result, max_steps=100)            # trains (imports the training stack)
    loraplan.merge("out/adapter", "merged")

Every user-facing error is a `loraplan.LoraplanError` (docs/python-api.md). The functions load on first use, so
`import loraplan` stays light.
"""

from loraplan.errors import LoraplanError

__all__ = ["LoraplanError", "merge", "plan", "run"]


def __getattr__(name: str):
    if name in ("plan", "run", "merge", "plan_request"):
        from loraplan import api

        return getattr(api, name)
    raise AttributeError(f"module 'loraplan' has no attribute {name!r}")
