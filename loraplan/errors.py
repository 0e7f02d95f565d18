"""The one exception type every user-facing loraplan error derives from (`loraplan.LoraplanError`).

The planner's InputError / PlanError / ArchitectureError (planner/errors.py) and the executor's RunError and its
subclasses (executor/errors.py) inherit it, so a notebook or script catches one type. Each carries `exit_code`,
the status the CLI exits with for it. This module imports nothing, so both halves can import it without cycles.
"""

from __future__ import annotations


class LoraplanError(Exception):
    """A one-line, user-facing error: bad input, a plan that cannot be used, or a run that failed."""

    exit_code = 2
