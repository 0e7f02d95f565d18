"""Fit the memory model's free coefficients on the measured H200 rows and write them to tables/memory.yaml.

    python benchmarks/fit_memory.py     # fit, write tables/memory.yaml, print the coefficients

1. Device level: one non-negative least squares, weighted by 1 / measured (so it minimises relative error),
   of device_used - (predicted loaded weights + checkpointed bf16 inputs + LoRA gradients + AdamW states +
   CUDA context) against the shape-dependent features of planner/memory/terms.py: [1, activations (both recipes
   without checkpointing; the plain recipe's recompute frame), trl's recompute frame, recompute, extra per
   checkpoint, T x V, T x V when tied]; trl's fused loss is derived
   (planner.memory.terms.fused_loss_bytes) and subtracted with the other fixed terms.
2. Split for the report: the caching allocator's share of the transients, fitted on reserved - allocated (less
   c_ckpt's part, which is the allocator's too) against [loss, activations]; memory.py shows it as its own row
   (the total does not change).
The CUDA context is the median of device_used - peak_reserved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.calibration import load_rows, row_inputs  # noqa: E402
from loraplan.planner.memory import terms as memory
from loraplan.planner.speed import throughput
from loraplan.tables import gpus  # noqa: E402
from loraplan.tables import TABLES_DIR  # noqa: E402

GIB = 2**30
NAMES = [
    "misc_bytes", "activation_scale", "fused_activation_scale", "recompute_scale", "checkpoint_extra_bytes",
    "full_loss_bytes_per_logit", "full_loss_tied_extra_bytes_per_logit",
]


def features(arch, shape) -> list[float]:
    x = memory.layer_activation_bytes_per_token(arch, shape.seq_len, shape)
    t, v, h, n_layers = shape.tokens, arch.vocab_size, arch.hidden_size, arch.num_layers
    full, gc = shape.loss == "full", shape.grad_checkpointing
    act = x * t * (1 if gc else n_layers)
    return [
        1.0,
        act if full or not gc else 0.0,
        0.0 if full or not gc else act,
        x * t if gc else 0.0,
        n_layers * h * t if gc else 0.0,
        t * v if full else 0.0,
        t * v if full and arch.tie_word_embeddings else 0.0,
    ]


def fit(rows: list[dict]) -> dict:
    """The fitted coefficients and the measured CUDA context from these calibration rows, as the `fitted` and
    `measured` sections of tables/memory.yaml (nothing is written; `benchmarks/accuracy.py --held-out` refits on
    subsets of the rows with it)."""
    context = float(np.median([r["device_used_gib_end"] - r["peak_reserved_gib"] for r in rows]))
    X, y, w, loaded_err = [], [], [], []
    for row in rows:
        arch, sel, shape = row_inputs(row)
        p = memory.trainable_params(sel, shape.rank)
        fixed = (
            memory.loaded_bytes(arch, sel, shape)
            + memory.DTYPE_BYTES[shape.dtype] * (arch.num_layers * arch.hidden_size * shape.tokens if shape.grad_checkpointing else 0)
            + memory.lora_gradients_bytes(p)
            + memory.optimizer_states_bytes(p, shape.optimizer)
            + (0.0 if shape.loss == "full" else memory.fused_loss_bytes(arch, shape))  # derived from trl's source
            + context * GIB
        )
        loaded_err.append(memory.loaded_bytes(arch, sel, shape) / GIB - row["loaded_alloc_gib"])
        X.append(features(arch, shape))
        y.append(row["device_used_gib_end"] * GIB - fixed)
        w.append(1.0 / (row["device_used_gib_end"] * GIB))
    X, y, w = np.array(X), np.array(y), np.array(w)
    c, _ = nnls(X * w[:, None], y * w)
    fitted = {n: round(float(v), 4) for n, v in zip(NAMES, c)}
    # the allocator's share: reserved - allocated against the allocated transients (loss, activations)
    # (c_ckpt, index 4, is itself the allocator's: refitted on peak allocated memory it is 0; memory.py puts it in
    # allocator_reserve, so the shares are fitted on what remains of reserved - allocated)
    loss_i, act_i = [5, 6], [1, 2, 3]
    fused = [0.0 if s.loss == "full" else memory.fused_loss_bytes(a, s) for a, _, s in (row_inputs(r) for r in rows)]
    X2 = np.array([[X[k][loss_i] @ c[loss_i] + fused[k], X[k][act_i] @ c[act_i]] for k in range(len(rows))])
    y2 = np.array([(r["peak_reserved_gib"] - r["peak_alloc_gib"]) * GIB - X[k][4] * c[4] for k, r in enumerate(rows)])
    rho, _ = nnls(X2 * w[:, None], y2 * w)
    fitted["reserve_share_of_loss"] = round(float(min(rho[0], 0.9)), 4)
    fitted["reserve_share_of_activations"] = round(float(min(rho[1], 0.9)), 4)
    measured = {"cuda_context_gib": round(context, 4), "card": "NVIDIA H200",
                "loaded_weights_max_error_gib": round(float(np.max(np.abs(loaded_err))), 4)}
    return {"fitted": fitted, "measured": measured}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    rows = load_rows()
    path = TABLES_DIR / "memory.yaml"
    table = yaml.safe_load(path.read_text())
    table.update(fit(rows))
    _write(path, table)
    memory.coefficients.cache_clear()
    # throughput: model FLOP utilisation of LoRA on the plain rows that report tokens/s; QLoRA's from the
    # paired rows (same model and shape, both methods), since the rows' shapes differ between methods
    mfu, speed = [], {}
    h200_tflops = gpus()["h200"]["peak_bf16_tflops"]  # the card the rows were measured on (tables/gpus.yaml)
    for row in rows:
        if row.get("tokens_per_s"):
            arch, sel, shape = row_inputs(row)
            speed[(row["model"], row["method"], row["batch"], row["seq"], row["grad_ckpt"])] = row["tokens_per_s"]
            if row["method"] == "lora":
                mfu.append(row["tokens_per_s"] * throughput.flops_per_token(arch, shape) / (h200_tflops * 1e12))
    pairs = [v / speed[(k[0], "qlora", *k[2:])] for k, v in speed.items()
             if k[1] == "lora" and (k[0], "qlora", *k[2:]) in speed]
    ratio = float(np.median(pairs))
    table["throughput"] = {
        "mfu_lora": round(float(np.median(mfu)), 4),
        "mfu_qlora": round(float(np.median(mfu)) / ratio, 4),
        "lora_speedup_over_qlora": round(ratio, 3),
        "pairs": len(pairs),
        "source": f"shared/calibration/plain-step.jsonl tokens_per_s on an H200 ({h200_tflops:g} TFLOP/s bf16, "
                  "tables/gpus.yaml): median LoRA MFU; "
                  "QLoRA = LoRA / the median LoRA:QLoRA speed ratio over rows of the same model and shape",
    }
    _write(path, table)
    memory.coefficients.cache_clear()
    print(yaml.safe_dump({k: table[k] for k in ("fitted", "measured", "throughput")}, sort_keys=False))


def _write(path: Path, table: dict) -> None:
    head = [line for line in path.read_text().splitlines() if line.startswith("#")]
    path.write_text("\n".join(head) + "\n" + yaml.safe_dump(table, sort_keys=False))


if __name__ == "__main__":
    main()
