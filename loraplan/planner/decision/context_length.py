"""`--seq-len max`: the longest context some configuration the request allows fits (planner.decision.rules.fits_at, at
every multiple of 256 up to the model's context). Why it stopped there is planner.decision.rules's `seq_len` reason.
"""

from __future__ import annotations

from typing import Optional

from ..facts import options
from .resolve import Resolved, with_seq_len
from .rules import fits_at


def longest_seq_len(r: Resolved) -> Optional[int]:
    """`--seq-len max`: the longest multiple of SEQ_LEN_STEP (256) up to r.seq_len_limit (the model's context) at
    which some configuration fits, or None when not even one step does. A binary search: the peak and the pinned
    host memory grow with the length, so fitting is monotone in it."""
    step = options.SEQ_LEN_STEP
    lo, hi = 1, r.seq_len_limit // step  # in steps
    if not fits_at(r, lo * step):
        return None
    if fits_at(r, hi * step):
        return hi * step
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        if fits_at(r, mid * step):
            lo = mid
        else:
            hi = mid
    return lo * step


def at_planned_length(r: Resolved, recount: bool = True) -> tuple[Resolved, Optional[int]]:
    """(the request at the length it is planned at, the longest context or None): under --seq-len max the longest
    that fits, or the shortest tried (SEQ_LEN_STEP) when none does; else as asked. The one step planner.api and
    planner.decision.fit_table share; `recount`: planner.decision.resolve.with_seq_len."""
    if not r.seq_len_max:
        return r, None
    longest = longest_seq_len(r)
    return with_seq_len(r, longest or options.SEQ_LEN_STEP, recount), longest
