"""User-facing errors of `run` and `merge`: one line, no traceback, a fixed exit status."""

from __future__ import annotations

from loraplan.errors import LoraplanError


class RunError(LoraplanError):
    """Bad input (plan, model, dataset, output folder, missing extra): exit 2 with one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TrainingFailed(RunError):
    """The run started but could not finish as planned (e.g. out of memory): exit 1."""

    exit_code = 1


class Interrupted(RunError):
    """SIGINT/SIGTERM: a checkpoint was saved (when one could be) and the run stopped; exit 130."""

    exit_code = 130


RUN_EXTRA_HINT = 'pip install -e ".[run]"'

# What `run` and `merge` import; bitsandbytes only matters for QLoRA and the 8-bit optimizers.
RUN_MODULES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors")


def require_run_extra(extra: tuple[str, ...] = ()) -> None:
    """Fail with one line naming the install command when the training stack is missing."""
    import importlib

    for name in RUN_MODULES + tuple(extra):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise RunError(
                f"the [run] extra is not installed ({name} cannot be imported: {exc}); install it with {RUN_EXTRA_HINT}"
            ) from None
