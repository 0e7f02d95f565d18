"""The measured calibration rows (tables/calibration, a copy of shared/calibration) and the planner inputs that
describe each row."""

from __future__ import annotations

import json
import os
from pathlib import Path

from loraplan.planner.architecture import families, targets, types
from loraplan.planner.memory.step import MicroStep

ROOT = Path(__file__).resolve().parents[1]


def calibration_dir() -> Path:
    """$LORAPLAN_CALIBRATION_DIR, else the repository's copy of the measurements (tables/calibration)."""
    env = os.environ.get("LORAPLAN_CALIBRATION_DIR")
    return Path(env) if env else ROOT / "loraplan" / "tables" / "calibration"


def load_rows(include_peft_upcast: bool = False) -> list[dict]:
    """Rows of plain-step.jsonl (recipe plain, predicted with loss=full) and trl-sft.jsonl (loss=fused).

    `qlora-peft` rows (prepare_model_for_kbit_training upcasts embeddings, lm_head and norms to fp32) describe a
    recipe `run` does not use; they are left out unless asked for."""
    folder = calibration_dir()
    rows = []
    for name in ("plain-step.jsonl", "trl-sft.jsonl"):
        with open(folder / name, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    if row["method"] == "qlora-peft" and not include_peft_upcast:
                        continue
                    rows.append(row)
    return rows


def row_config(row: dict) -> dict:
    with open(calibration_dir() / row["config"], encoding="utf-8") as f:
        return json.load(f)


def row_inputs(row: dict) -> tuple[types.Architecture, targets.TargetSelection, MicroStep]:
    arch = families.from_config(row_config(row))
    sel = targets.select_targets(arch, None)  # q,k,v,o,gate,up,down as measured
    shape = MicroStep(
        method=row["method"],
        rank=row["r"],
        micro_batch_size=row["batch"],
        seq_len=row["seq"],
        grad_checkpointing=row["grad_ckpt"],
        loss="full" if row["recipe"] == "plain" else "fused",
        optimizer="adamw",
        dtype="bfloat16",
        double_quant=True,
    )
    return arch, sel, shape
