"""The Unsloth backend's planned peak at each length of Unsloth's published context table.

    python benchmarks/unsloth_table.py            # markdown: card, published length, planned peak, difference

Unsloth's table (its Llama 3.1 blog post; GitHub README "Context length benchmarks"): Llama 3.1 8B Instruct, QLoRA on
all seven projections, rank 32, batch 1, rows padded to the length, Unsloth's gradient checkpointing. It gives the
longest context per card. The lengths are exactly linear in the card's memory (about 1,890 tokens per GB: e.g.
(342,733 - 191,728) / 32 = 4,718.9 per GB over 48 -> 80 GB, and the same slope between every pair), so they were
extrapolated from a few measured lengths, not measured one by one: a planned peak near the card's memory at each
length checks the slope and the intercept of that line, not seven measurements.

Assumptions the table does not state, taken from Unsloth's own notebooks: adamw_8bit, bf16, lora_dropout 0,
bias "none". A card of "N GB" is taken as N GiB (the cards of those sizes report N GiB, less what the driver keeps).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from loraplan.planner.memory import terms as memory
from loraplan.planner.architecture.families import from_config
from loraplan.planner.architecture.targets import select_targets
from loraplan.planner.memory.unsloth import unsloth_budget, unsloth_host_terms
from loraplan.tables import TABLES_DIR  # noqa: E402

GIB = 2**30
# card memory (GB as published) -> the longest context Unsloth publishes for it
PUBLISHED = {8: 2972, 12: 21848, 16: 40724, 24: 78475, 40: 153977, 48: 191728, 80: 342733}
RANK = 32


def llama_31_8b():
    models = yaml.safe_load((TABLES_DIR / "models.yaml").read_text())
    return from_config(models["llama-3.1-8b"]["config"])


def shape(seq_len: int) -> memory.MicroStep:
    return memory.MicroStep(method="qlora", rank=RANK, micro_batch_size=1, seq_len=seq_len, grad_checkpointing=True,
                   loss="fused", optimizer="adamw-8bit")


def planned(card_gb: int, seq_len: int) -> tuple[float, list[memory.Term], list[memory.Term]]:
    arch = llama_31_8b()
    sel = select_targets(arch, None)
    s = shape(seq_len)
    terms = unsloth_budget(arch, s, memory.budget(arch, sel, s), dropout=0.0, card_bytes=card_gb * GIB)
    return memory.Term.sum_gib(terms), terms, unsloth_host_terms(arch, s)


def rows() -> list[dict]:
    out = []
    for card, seq in PUBLISHED.items():
        peak, terms, host = planned(card, seq)
        out.append({"card_gib": card, "seq_len": seq, "planned_gib": peak, "error": peak / card - 1,
                    "host_gib": memory.Term.host_gib(host)})
    return out


def markdown() -> str:
    lines = ["| card | published longest context | planned peak at that length | planned / card | pinned host |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows():
        lines.append(f"| {r['card_gib']} GB | {r['seq_len']:,} | {r['planned_gib']:.2f} GiB | "
                     f"{100 * r['error']:+.1f} % | {r['host_gib']:.1f} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
    if "--terms" in sys.argv:
        for card, seq in PUBLISHED.items():
            peak, terms, _ = planned(card, seq)
            print(f"\n{card} GB @ {seq}: " + ", ".join(f"{t.name} {t.gib:.2f}" for t in terms))
