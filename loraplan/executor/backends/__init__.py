"""Training backends, the executor's side of the seam: one module per entry of the planner's table
(loraplan/planner/plugins/backends.py), named after it ("hf" -> backends/hf.py, "a-b" -> backends/a_b.py), each exposing
`BACKEND`, an object with:

    name                                        the planner entry's name
    check_installed(plan)                       RunError naming the install command when an import is missing
    prepare_process()                           called first in every process that trains (`loraplan run`, and
                                                each launcher worker, executor/worker.py), before the stack loads
    set_seed(seed)                              seed every generator the backend's libraries use
    load_tokenizer(plan, model_dir)             the tokenizer, with a pad token
    load_model(plan, model_dir, device_map)     the base model, 4-bit when the plan says qlora
    wrap_adapter(plan, model, base_ref)         the model with the plan's LoRA adapter (base_ref: where merge
                                                finds the base)
    build_trainer(plan, state, model, tokenizer, train_dataset, eval_dataset, callbacks)
                                                a transformers Trainer: train_plan calls its train, evaluate,
                                                save_model, state and accelerator
    load_last_step(trainer, checkpoint, sharded)  a last-step checkpoint's weights and state, without a step

The registry is keyed by the planner's names and imports a module only when its backend is asked for: importing
this package loads no training library.
"""

from __future__ import annotations

import importlib
from typing import Any

from loraplan.planner.plugins.backends import BACKENDS as PLANNED

from ..errors import RUN_EXTRA_HINT, RunError

# planner name -> the module that runs it
MODULES: dict[str, str] = {name: f"{__name__}.{name.replace('-', '_')}" for name in PLANNED}


def backend_named(name: str) -> Any:
    if name not in MODULES:
        raise RunError(f"training backend {name!r} is not one this loraplan runs ({', '.join(MODULES)})")
    return importlib.import_module(MODULES[name]).BACKEND


def backend_for(plan) -> Any:
    """The executor's backend object for plan.training.backend."""
    return backend_named(plan.training.backend)


def require_imports(name: str) -> None:
    """The planner entry's import names are importable, else one line with its install hint."""
    entry = PLANNED[name]
    for module in entry.imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            hint = entry.install_hint or RUN_EXTRA_HINT
            raise RunError(f"training backend {name} needs {module}, which cannot be imported ({exc}); install "
                           f"it with {hint}") from None
