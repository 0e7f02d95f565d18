"""Write tests/golden/plans.json: the numbers `loraplan plan --json` gives for every calibration row and every
catalog model (on a few cards and options), so a refactor can prove it changed none of them.

    python tests/golden/make_golden.py          # regenerate (only when a change of numbers is intended)

tests/test_golden_plans.py recomputes every case and compares. Text (reasons, suggestions, assumptions) and
paths are left out: they may be reworded; the numbers and decisions may not change unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

OUT = Path(__file__).resolve().parent / "plans.json"


def calibration_cases() -> list[dict]:
    from benchmarks.calibration import load_rows

    cases = []
    for row in load_rows():
        cases.append(dict(
            id=f"calib/{row['recipe']}/{row['model']}/{row['method']}/b{row['batch']}/s{row['seq']}/gc{int(row['grad_ckpt'])}",
            calibration_config=row["config"], gpu="h200", method=row["method"], rank=row["r"],
            batch_size=row["batch"], global_batch_size=row["batch"], seq_len=row["seq"],
            grad_checkpointing="on" if row["grad_ckpt"] else "off",
            loss="full" if row["recipe"] == "plain" else "fused", fit_table=False,
        ))
    return cases


def catalog_cases() -> list[dict]:
    from loraplan.tables import models

    cases = []
    for name in models():
        cases.append(dict(id=f"catalog/{name}/rtx-4090", model=name, gpu="rtx-4090", fit_table=True))
        cases.append(dict(id=f"catalog/{name}/h100x8-lora-4096", model=name, gpu="h100-80gb", num_gpus=8,
                          method="lora", seq_len=4096, fit_table=False))
        cases.append(dict(id=f"catalog/{name}/a100-qlora-8bit-full", model=name, gpu="a100-80gb", method="qlora",
                          optimizer="adamw-8bit", loss="full", rank=64, fit_table=False))
    cases.append(dict(id="catalog/llama-3.1-8b/cpu", model="llama-3.1-8b", gpu="cpu", fit_table=False))
    cases.append(dict(id="catalog/llama-3.1-8b/t4-gc-off", model="llama-3.1-8b", gpu="t4", grad_checkpointing="off",
                      fit_table=False))
    cases.append(dict(id="catalog/qwen2.5-7b/custom-attn-only", model="qwen2.5-7b", gpu="custom", gpu_memory="20GiB",
                      targets="q,v", seq_len=1024, global_batch_size=32, fit_table=False))
    return cases


def request_of(case: dict):
    from benchmarks.calibration import calibration_dir
    from loraplan.planner.api import PlanRequest

    kw = {k: v for k, v in case.items() if k not in ("id", "calibration_config")}
    if "calibration_config" in case:
        kw["model"] = str(calibration_dir() / case["calibration_config"])
    return PlanRequest(**kw)


def numbers(result_json: dict) -> dict:
    """The facts that must not change: counts, memory terms, decision, estimate, fit table."""
    j = result_json
    return {
        "feasible": j["feasible"],
        "architecture": j["architecture"],
        "adapter": {k: j["adapter"][k] for k in ("trainable_params", "r", "lora_alpha", "lora_dropout",
                                                   "target_modules", "target_parameters")},
        "memory": {k: j["memory"][k] for k in ("per_gpu_gib", "usable_gib", "headroom_gib", "terms")},
        "decision": {k: v for k, v in j["decision"].items() if k != "reasons"},
        "training": j["training"],
        "estimate": {k: v for k, v in j["estimate"].items() if k != "basis"},
        "fit_table": j["fit_table"],
    }


def compute(case: dict) -> dict:
    from loraplan.planner.api import make_plan

    return numbers(make_plan(request_of(case)).to_json())


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cases = calibration_cases() + catalog_cases()
    out = {"generated_at_commit": commit, "command": "python tests/golden/make_golden.py",
           "cases": [{"case": c, "numbers": compute(c)} for c in cases]}
    OUT.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{len(cases)} cases -> {OUT}")


if __name__ == "__main__":
    main()
