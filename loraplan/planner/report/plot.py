"""`loraplan plan ... --plot FILE` (and `PlanResult.plot`): the chosen configuration's peak memory per GPU against
the sequence length, stacked by the memory model's terms (decide.budget at each length, with the plan's method,
micro-batch, checkpointing, savers and strategy), with the card's usable line, the plan's length, the longest
length this configuration fits and, with the fit table, each catalog card's usable memory.

matplotlib (the optional extra `loraplan[plot]`) is imported only here, inside the function, on the Agg backend:
`plan` without --plot never loads it. PNG or SVG, chosen by the file's extension.
"""

from __future__ import annotations

import dataclasses
import os

from ..decision import rules
from ..errors import InputError
from ..facts import options

FORMATS = (".png", ".svg")
PLOT_EXTRA_HINT = "pip install 'loraplan[plot]'"


def memory_curve(res, seq_lens: list[int]) -> tuple[list[str], list[list[float]]]:
    """(term names, GiB of each term at each length) for the plan's chosen configuration."""
    r, c = res.resolved, res.choice
    names: list[str] = []
    values: dict[str, list[float]] = {}
    for i, L in enumerate(seq_lens):
        at = dataclasses.replace(r, seq_len=L)
        terms = rules.budget(at, rules.shape(at, c.method, c.micro_batch_size, c.grad_checkpointing, seq_len=L,
                                     savers=c.savers), c.savers)
        for t in terms:
            if t.name not in values:
                names.append(t.name)
                values[t.name] = [0.0] * len(seq_lens)
            values[t.name][i] = t.gib
    return names, [values[n] for n in names]


def longest_fitting(res, limit: int) -> int:
    """The longest multiple of SEQ_LEN_STEP (up to LIMIT) at which this configuration stays under the usable
    memory; 0 when even the shortest does not."""
    def total(L: int) -> float:
        return sum(v[0] for v in memory_curve(res, [L])[1])

    step = options.SEQ_LEN_STEP
    lo, hi = 0, limit // step
    while lo < hi:  # memory grows with the length: binary search
        mid = (lo + hi + 1) // 2
        if total(mid * step) <= res.usable_gib:
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def check_plot_path(path: str) -> None:
    """One line for a file that is neither .png nor .svg, or when matplotlib is not installed."""
    import importlib.util

    if os.path.splitext(path)[1].lower() not in FORMATS:
        raise InputError(f"--plot {path}: the file must end in .png or .svg")
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA_HINT}")


def plot_memory(res, path: str) -> str:
    """Draw the picture into PATH (.png or .svg); returns PATH. InputError on another extension or no matplotlib."""
    check_plot_path(path)
    if res.resolved is None or res.choice is None:
        raise InputError("--plot needs a plan made in this process (a PlanResult from make_plan)")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    r, plan = res.resolved, res.plan
    limit = r.seq_len_limit
    longest = longest_fitting(res, limit)
    top = min(limit, max(4 * plan.training.seq_len, int(longest * 1.5), 4096))
    seq_lens = sorted({max(1, round(256 * (top / 256) ** (i / 47))) for i in range(48)} | {plan.training.seq_len})
    names, stacks = memory_curve(res, seq_lens)

    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=120)
    try:
        colors = plt.get_cmap("tab20").colors
        ax.stackplot(seq_lens, stacks, labels=[n.replace("_", " ") for n in names],
                     colors=[colors[i % len(colors)] for i in range(len(names))], alpha=0.9)
        hw = plan.hardware
        ax.axhline(res.usable_gib, color="red", linestyle="--", linewidth=1.5,
                   label=f"usable on {hw.gpu_name}: {res.usable_gib:.1f} GiB")
        ax.axvline(plan.training.seq_len, color="black", linewidth=1.2,
                   label=f"this plan: {plan.training.seq_len:,} tokens")
        if longest:
            ax.axvline(longest, color="red", linestyle=":", linewidth=1.5,
                       label=f"longest that fits: {longest:,} tokens")
        context = r.arch.config.get("max_position_embeddings")
        if isinstance(context, int) and context <= top:
            ax.axvline(context, color="0.4", linestyle="-.", linewidth=1, label=f"model context: {context:,}")
        ymax = max(sum(s[-1] for s in stacks), res.usable_gib) * 1.08
        cards: dict[float, list[str]] = {}  # each card's usable memory (cards of one size share a line)
        for row in res.fit_table:
            cards.setdefault(round(row.memory_gib * (1 - plan.prediction.margin), 1), []).append(row.gpu)
        for usable, keys in cards.items():
            if usable <= ymax:
                ax.axhline(usable, color="0.6", linewidth=0.6)
                ax.text(seq_lens[-1], usable, " " + ", ".join(keys), fontsize=6, va="center", ha="left", color="0.3")
        ax.set_xscale("log", base=2)
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"))
        ax.set_xlim(seq_lens[0], seq_lens[-1])
        ax.set_ylim(0, ymax)
        ax.set_xlabel("sequence length (tokens per sequence, log scale)")
        ax.set_ylabel("peak memory per GPU (GiB)")
        t = plan.training
        ax.set_title(f"{plan.model.name}: {plan.method}, {plan.strategy}, micro-batch {t.micro_batch_size}, "
                     f"checkpointing {'on' if t.grad_checkpointing else 'off'}"
                     + (f", savers {', '.join(plan.savers.names)}" if plan.savers.names else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.14 if res.fit_table else 1.01, 1.0))
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
