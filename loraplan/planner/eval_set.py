"""The plan's eval set (`plan --eval-path` / `--eval-fraction`): checked here, written to plan.dataset.eval_path and
eval_fraction, and used by `run` (executor/data.py: a held-out file, or a seeded share of the training rows)."""

from __future__ import annotations

import math
import os
from typing import Optional

from .dataset_reader import read_dataset
from .errors import InputError


def check_eval_set(eval_path: Optional[str], eval_fraction: Optional[float],
                   dataset_format: Optional[str]) -> tuple[Optional[str], float]:
    """(the eval file, absolute, or None; the share of --dataset held out), one-line InputErrors otherwise.
    `dataset_format` is the training file's format (None without --dataset): the eval file is read, and every row
    checked in that format, by the same reader `run` uses (planner.dataset_reader; executor/data.py reads it so)."""
    if eval_fraction is not None:
        if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) \
                or not math.isfinite(eval_fraction) or not 0 <= eval_fraction < 1:
            raise InputError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    fraction = float(eval_fraction or 0.0)
    if eval_path is not None and fraction > 0:
        raise InputError("--eval-path and --eval-fraction are two ways to name the eval set: give one")
    if (eval_path is not None or fraction > 0) and not dataset_format:
        flag = "--eval-path" if eval_path is not None else "--eval-fraction"
        raise InputError(f"{flag} needs --dataset: the eval set is checked against the training data's format")
    if eval_path is None:
        return None, fraction
    if not eval_path.strip():
        raise InputError("--eval-path is empty")
    path = os.path.abspath(os.path.expanduser(eval_path))  # absolute: the plan runs from any folder
    read_dataset(path, dataset_format, what="eval dataset")
    return path, fraction
