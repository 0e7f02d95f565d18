"""The planner's user-facing errors, in one place: each becomes a one-line message and exit status 2.

`first_line` is how every one-line error quotes an exception from a library (its first line, or its type).
"""

from __future__ import annotations

from loraplan.errors import LoraplanError


class InputError(LoraplanError, ValueError):
    """Bad input to `plan` (a model, card, option or dataset that cannot be used): exit 2 with one line."""


class ArchitectureError(LoraplanError, ValueError):
    """A config the planner cannot count (unknown model_type, missing field, no adaptable layer)."""


class PlanError(LoraplanError, ValueError):
    """A plan file that is missing, malformed, of an unknown version or inconsistent."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when empty): what one-line errors quote."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
