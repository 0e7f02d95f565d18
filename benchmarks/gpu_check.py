"""GPU check: plan and run a few real training steps per calibration architecture; predicted vs observed.

For each architecture under tables/calibration/configs/NAME/config.json (or $LORAPLAN_CALIBRATION_DIR/configs), this
builds the model with random weights (memory does not depend on the values), saves it with a small offline tokenizer,
plans a LoRA and a QLoRA run with `planner.api.make_plan` for the GPU it finds, runs each plan with `loraplan run`'s
executor in a fresh process (so every run starts from a clean CUDA context), and prints predicted vs observed peak
memory per GPU and tokens/s as a table. Results also go to --json.

    python benchmarks/gpu_check.py                       # qwen2.5-0.5b and llama-3.2-1b, 4 x 1024 tokens
    python benchmarks/gpu_check.py --configs all --batch-size 2 --seq-len 2048 --steps 3

Without a CUDA device it says so and exits 0. Building the larger configs writes their full weights to disk
(Llama-3.1-8B: 16 GB in bf16), so they are opt-in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(os.environ.get("LORAPLAN_CALIBRATION_DIR") or os.path.join(ROOT, "loraplan", "tables", "calibration"), "configs")
DEFAULT_CONFIGS = ("qwen2.5-0.5b", "llama-3.2-1b")
sys.path.insert(0, ROOT)


def _gpu_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def build_model_dir(config_path: str, out_dir: str) -> str:
    """Random-weight bf16 model from a config.json plus the executor's offline byte-level tokenizer, built in a
    child process: a CUDA context left in this process would count as another process's memory in every run."""
    if not os.path.exists(os.path.join(out_dir, "tokenizer.json")):  # written last: the build finished
        subprocess.run([sys.executable, os.path.abspath(__file__), "--build", config_path, out_dir], check=True)
    return out_dir


def _build(config_path: str, out_dir: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraplan.executor.tiny import build_tokenizer

    config = AutoConfig.from_pretrained(os.path.dirname(config_path))
    with torch.device("cuda"):  # init on the GPU: minutes faster than on the CPU for billions of parameters
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    del model
    torch.cuda.empty_cache()
    build_tokenizer().save_pretrained(out_dir)
    return out_dir


def write_dataset(path: str, rows: int = 256) -> str:
    """Plain text rows long enough to fill any seq_len (truncated to it), so every sequence is full length."""
    words = "the quick brown fox jumps over the lazy dog while bees make honey and grass is green".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            text = " ".join(words[(i + j) % len(words)] for j in range(6000))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def _plan(request: dict, plan_path: str) -> None:
    """Child process: plan with planner.api (its --gpu auto touches CUDA, which must not happen in this process)."""
    from loraplan.planner.api import PlanRequest, make_plan

    plan = make_plan(PlanRequest(**request)).plan
    plan.training.save_steps = 10**6  # no checkpoint writes inside the measured steps
    plan.training.logging_steps = 1
    plan.save(plan_path)


def run_case(model_dir: str, data: str, out_dir: str, method: str, args) -> dict:
    from loraplan.executor.summary import RunSummary
    from loraplan.planner.planfile.schema import Plan

    request = dict(model=model_dir, gpu="auto", method=method, rank=args.rank, seq_len=args.seq_len,
                   batch_size=args.batch_size, global_batch_size=args.batch_size, dataset=data, output_dir=out_dir,
                   max_steps=args.steps, grad_checkpointing=args.grad_checkpointing)
    plan_path = f"{out_dir}.yaml"
    os.makedirs(os.path.dirname(plan_path), exist_ok=True)
    made = subprocess.run([sys.executable, os.path.abspath(__file__), "--plan", json.dumps(request), plan_path],
                          cwd=ROOT, capture_output=True, text=True)
    if made.returncode != 0:
        lines = (made.stderr or made.stdout).strip().splitlines()
        return {"method": method, "exit": made.returncode, "error": "plan: " + (lines[-1] if lines else "failed"),
                "batch": args.batch_size, "seq": args.seq_len, "grad_ckpt": None, "predicted_gib": float("nan")}
    plan = Plan.load(plan_path)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loraplan.executor.cli", "run", plan_path, "--overwrite"], cwd=ROOT,
                          capture_output=True, text=True)
    row = {"method": method, "batch": plan.training.micro_batch_size, "seq": plan.training.seq_len,
           "grad_ckpt": plan.training.grad_checkpointing, "predicted_gib": plan.prediction.per_gpu_gib,
           "predicted_tokens_per_s": plan.prediction.tokens_per_s, "exit": proc.returncode,
           "wall_s": time.perf_counter() - t0}
    summary_path = os.path.join(out_dir, "summary.json")
    if proc.returncode == 0 and os.path.exists(summary_path):
        s = RunSummary.read(summary_path)
        used_end = s.device_used_gib_end_per_gpu or [None]
        row.update(observed_gib=s.observed_peak_gib, tokens_per_s=s.tokens_per_s,
                   context_gib=s.cuda_context_gib, device_used_end_gib=max(used_end, key=lambda x: x or 0),
                   over_prediction=s.over_prediction)
    else:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        row["error"] = lines[-1] if lines else f"exit {proc.returncode}"
        if os.path.exists(summary_path):  # an out-of-memory run still records its observed peak
            row["observed_gib"] = RunSummary.read(summary_path).observed_peak_gib
    return row


def fsdp_qlora_load(model_dir: str, data: str, out_dir: str, args) -> list[dict]:
    """Two ranks, QLoRA under fsdp-offload (issue 13's loading path, "every-rank-host"): the run's observed per-GPU
    peak against the plan's training peak and its load peak (plan.reasons['loading']). Needs two GPUs; [] else."""
    import torch

    if torch.cuda.device_count() < 2:
        return []
    request = dict(model=model_dir, gpu="auto", num_gpus=2, strategy="fsdp-offload", method="qlora", rank=args.rank,
                   seq_len=args.seq_len, batch_size=args.batch_size, global_batch_size=2 * args.batch_size,
                   dataset=data, output_dir=out_dir, max_steps=args.steps, grad_checkpointing=args.grad_checkpointing)
    plan_path = f"{out_dir}.yaml"
    os.makedirs(os.path.dirname(plan_path), exist_ok=True)
    made = subprocess.run([sys.executable, os.path.abspath(__file__), "--plan", json.dumps(request), plan_path],
                          cwd=ROOT, capture_output=True, text=True)
    if made.returncode != 0:
        return [{"method": "qlora fsdp-offload x2", "exit": made.returncode, "error": made.stderr.strip()[-300:],
                 "batch": args.batch_size, "seq": args.seq_len, "grad_ckpt": None, "predicted_gib": float("nan")}]
    from loraplan.executor.summary import RunSummary
    from loraplan.planner.planfile.schema import Plan

    plan = Plan.load(plan_path)
    proc = subprocess.run([sys.executable, "-m", "loraplan.executor.cli", "run", plan_path, "--overwrite"], cwd=ROOT,
                          capture_output=True, text=True)
    row = {"method": "qlora fsdp-offload x2", "batch": plan.training.micro_batch_size, "seq": plan.training.seq_len,
           "grad_ckpt": plan.training.grad_checkpointing, "predicted_gib": plan.prediction.per_gpu_gib,
           "loading": plan.reasons.get("loading"), "exit": proc.returncode}
    summary_path = os.path.join(out_dir, "summary.json")
    if proc.returncode == 0 and os.path.exists(summary_path):
        s = RunSummary.read(summary_path)
        row.update(observed_gib=s.observed_peak_gib, observed_per_gpu=s.observed_peak_gib_per_gpu,
                   host_peak_gib=s.host_peak_gib, tokens_per_s=s.tokens_per_s)
    else:
        row["error"] = (proc.stderr or proc.stdout).strip()[-300:]
    return [row]


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--build":  # the child process of build_model_dir
        _build(sys.argv[2], sys.argv[3])
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "--plan":  # the child process of run_case
        _plan(json.loads(sys.argv[2]), sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated names, or 'all'")
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grad-checkpointing", choices=["auto", "on", "off"], default="on")
    parser.add_argument("--work-dir", default=None, help="where models and runs go (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    if not _gpu_present():
        print("gpu_check: no CUDA GPU visible (or torch missing); nothing to measure. Run it on a GPU machine.")
        return 0
    import torch

    names = sorted(os.listdir(CONFIGS)) if args.configs == "all" else args.configs.split(",")
    work = args.work_dir or tempfile.mkdtemp(prefix="loraplan-gpu-check-")
    data = write_dataset(os.path.join(work, "data.jsonl"))
    rows = []
    for name in names:
        config = os.path.join(CONFIGS, name, "config.json")
        if not os.path.exists(config):
            print(f"skip {name}: no {config}")
            continue
        model_dir = build_model_dir(config, os.path.join(work, "models", name))
        for method in args.methods.split(","):
            row = {"model": name, **run_case(model_dir, data, os.path.join(work, "runs", f"{name}-{method}"), method, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows += [{"model": name, **r} for r in fsdp_qlora_load(model_dir, data, os.path.join(work, "runs", f"{name}-qlora-fsdp2"), args)]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gpu_check on {torch.cuda.get_device_name(0)} (torch {torch.__version__})")
    for col in ("model", "method", "batch x seq", "ckpt", "predicted GiB", "observed GiB", "used at end GiB", "error",
                "tok/s pred", "tok/s obs"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for r in rows:
        obs = r.get("observed_gib")
        err = f"{(obs - r['predicted_gib']) / obs:+.1%}" if obs else r.get("error", "-")
        pt = r.get("predicted_tokens_per_s")
        table.add_row(r["model"], r["method"], f"{r['batch']} x {r['seq']}", "on" if r["grad_ckpt"] else "off",
                      f"{r['predicted_gib']:.2f}", "-" if obs is None else f"{obs:.2f}",
                      "-" if r.get("device_used_end_gib") is None else f"{r['device_used_end_gib']:.2f}", err,
                      "-" if pt is None else f"{pt:,.0f}",
                      "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}")
    Console().print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
