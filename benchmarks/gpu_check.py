"""GPU check: the one call that checks everything that needs a GPU, on one lent card (the truth loop, issue 15).

Each check is an *entry*: a function registered in ENTRIES with a time budget, the packages it needs, the GPUs it
needs and the question it answers. Entries run in the table's order (by value: peaks first). An entry whose package
is missing, or that needs more GPUs than there are, is skipped with the reason; one that fails or runs past its
budget is recorded as such and the next one runs, so one failure never loses the rest. Every entry's rows are
appended to OUT/gpu_check.json as they come (OUT: --out, else $OUT, else the work dir), and a markdown summary is
printed at the end and written to OUT/gpu_check.md.

    peaks          LoRA and QLoRA peaks at a few shapes: `loraplan plan` for this card, `loraplan run`, observed vs
                   predicted (summary.json)
    savers         each CUDA-only saver (offload_checkpoints, offload_activations, mlp_tiling, padding_free): the run
                   completes, its observed peak and pinned host memory against the plan
    recipes        the calibration's two recipes on one of its shapes: a plain PyTorch step (`--loss full` plan)
                   beside trl's SFTTrainer through `loraplan run --memory-snapshot` (`--loss fused` plan)
    snapshots      `run --memory-snapshot` on the trl row the memory model cannot explain (issue 15), with and
                   without dropout: what held each peak, by the code that allocated it, beside the plan's terms
    resume_merge   kill (SIGINT) after a checkpoint, `run --resume`, the same final adapter as an uninterrupted run;
                   then `loraplan merge` and the merged model's logits against base + adapter
    unsloth        `plan --backend unsloth` beside `--backend hf` on the same shapes: peak and tokens/s
    fsdp_qlora_load  two ranks, QLoRA under fsdp-offload, loaded layer-streamed (issue 13): per-GPU peak against the
                   plan's training and load peaks, and the weights each rank held loading; skipped with "needs 2
                   GPUs" on one

Models are the calibration architectures (tables/calibration/configs/NAME/config.json, or
$LORAPLAN_CALIBRATION_DIR/configs) built with random weights on the GPU: nothing is downloaded. Every plan comes from
the `loraplan plan` CLI for the card found (its name and memory read once, in a child process, as `--gpu auto` reads
them), and every run is `loraplan run` in a fresh process, so each starts from a clean CUDA context.

    python benchmarks/gpu_check.py                       # every entry, about 8 minutes on an H200
    python benchmarks/gpu_check.py --only peaks,savers
    python benchmarks/gpu_check.py --dry-run             # no GPU: build every plan and command, check them

--dry-run plans for the catalog's H200 and checks, without a GPU, that every plan is written, loads, fits the card,
uses the savers / loss / backend its entry asked for, and that every command is a `loraplan` command on a plan that
exists. Without a GPU and without --dry-run it says so and exits 0. docs/gpu-validation.md says how to run it on a
lent device in one call, the wheels it needs there, and what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = os.path.join(os.environ.get("LORAPLAN_CALIBRATION_DIR") or os.path.join(ROOT, "loraplan", "tables", "calibration"), "configs")
TOTAL_BUDGET_S = 540  # 9 minutes of machine time for the whole call
PROBE_BUDGET_S = 30  # the package probe and the GPU's name, before the first entry
DRY_RUN_CARD = "h200"  # the card --dry-run plans for (the catalog's)
# The packages whose presence decides what can run, imported in a child process (a CUDA context in this process would
# count as another process's memory in every run): import name -> pip name.
# unsloth first: a real Unsloth process imports it before the rest.
PROBED = {"unsloth": "unsloth", "torch": "torch", "transformers": "transformers", "peft": "peft", "trl": "trl",
          "datasets": "datasets", "accelerate": "accelerate", "bitsandbytes": "bitsandbytes",
          "liger_kernel": "liger-kernel", "flash_attn": "flash-attn"}
# What the carried wheels need from the image (docs/gpu-validation.md): their versions go in the header, read from
# package metadata only, so a mismatch shows in the first call's output.
IMAGE_NEEDS = ("pyarrow", "fsspec", "pandas", "tokenizers", "huggingface-hub", "safetensors", "regex", "triton",
               "numpy", "matplotlib")
RUN_STACK = ("torch", "transformers", "peft", "trl", "datasets", "accelerate")


class CheckError(Exception):
    """An entry's check failed: the plan or the run does not say what the entry expected."""


class Skip(Exception):
    """An entry (or one of its cases) cannot run here; the message is the reason."""


# ---------------------------------------------------------------------------------------------------------------
# the entry table


@dataclass(frozen=True)
class Entry:
    name: str
    budget_s: int
    needs: tuple[str, ...]  # import names (PROBED keys); missing -> skipped with the pip name
    min_gpus: int
    question: str
    fn: Callable[["Context"], None]


ENTRIES: list[Entry] = []


def entry(name: str, budget_s: int, needs: tuple[str, ...] = RUN_STACK, min_gpus: int = 1, question: str = ""):
    def register(fn):
        ENTRIES.append(Entry(name, budget_s, needs, min_gpus, question or (fn.__doc__ or "").strip().split("\n")[0], fn))
        return fn
    return register


# ---------------------------------------------------------------------------------------------------------------
# the context an entry runs in: plans, runs, models, rows


@dataclass
class Context:
    work: str
    out: str
    dry_run: bool
    card_args: list[str]
    imports: dict[str, Optional[str]]  # import name -> None when it imports, else the one-line error
    gpus: int
    steps: int = 3
    entry: Optional[Entry] = None
    entry_deadline: float = 0.0
    deadline: float = 0.0
    rows: list[dict] = field(default_factory=list)
    data: str = ""

    # time -------------------------------------------------------------------------------------------------------
    def seconds_left(self) -> float:
        return max(0.0, min(self.entry_deadline, self.deadline) - time.monotonic())

    def has_time(self, at_least: float = 20.0) -> bool:
        return self.dry_run or self.seconds_left() >= at_least

    # packages ---------------------------------------------------------------------------------------------------
    def missing(self, *names: str) -> Optional[str]:
        """The skip reason when one of these packages does not import here; None when all do (always in --dry-run,
        which builds every plan whatever is installed)."""
        if self.dry_run:
            return None
        for n in names:
            err = self.imports.get(n, "not probed")
            if err is not None:
                return f"{PROBED.get(n, n)} does not import here ({err}); carry its wheel (docs/gpu-validation.md)"
        return None

    # models -----------------------------------------------------------------------------------------------------
    def model(self, name: str) -> str:
        """A model directory for calibration architecture NAME: its config.json and the executor's offline tokenizer
        (here, on the CPU), and random bf16 weights (built on the GPU in a child process, skipped by --dry-run)."""
        config = os.path.join(CONFIGS, name, "config.json")
        if not os.path.exists(config):
            raise Skip(f"no calibration config {config}")
        out = os.path.join(self.work, "models", name)
        if os.path.exists(os.path.join(out, "READY" if not self.dry_run else "tokenizer.json")):
            return out
        os.makedirs(out, exist_ok=True)
        shutil.copy(config, os.path.join(out, "config.json"))
        if not self.dry_run:
            _child(["--build", out], timeout=max(10.0, self.seconds_left()), what=f"build {name}")
            open(os.path.join(out, "READY"), "w").close()
        else:
            from loraplan.executor.tiny import build_tokenizer

            build_tokenizer().save_pretrained(out)
        return out

    # plans ------------------------------------------------------------------------------------------------------
    def plan(self, tag: str, model_dir: str, method: str, batch: int, seq: int, ckpt: str, *flags: str,
             steps: Optional[int] = None, save_steps: Optional[int] = None, expect_savers: tuple[str, ...] = (),
             num_gpus: int = 1):
        """`loraplan plan` for this card and shape into WORK/runs/ENTRY-TAG.yaml; returns (path, Plan). The run
        writes no checkpoint inside the measured steps unless save_steps is given. Checks that the plan fits and
        uses the savers it was asked for (CheckError otherwise)."""
        from loraplan.planner.planfile.schema import Plan

        name = f"{self.entry.name}-{tag}"
        out_dir = os.path.join(self.work, "runs", name)
        path = out_dir + ".yaml"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        argv = [sys.executable, "-m", "loraplan.cli", "plan", model_dir, *self.card_args, "--num-gpus", str(num_gpus),
                "--method", method, "--batch-size", str(batch), "--global-batch-size", str(batch * num_gpus), "--seq-len", str(seq),
                "--grad-checkpointing", ckpt, "--dataset", self.data, "--output-dir", out_dir,
                "--max-steps", str(steps or self.steps), "--no-fit-table", "-o", path, *flags]
        made = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        if made.returncode == 2 or not os.path.exists(path):
            raise CheckError(f"plan {name}: exit {made.returncode}: {_last_line(made)}")
        plan = Plan.load(path)
        if made.returncode == 1 or not plan.fits():
            raise CheckError(f"plan {name}: does not fit {plan.hardware.gpu_name} ({plan.prediction.per_gpu_gib:.1f} GiB)")
        missing = [s for s in expect_savers if s not in plan.savers.names]
        if missing:
            raise CheckError(f"plan {name}: asked for {', '.join(missing)}, the plan's savers are "
                             f"{plan.savers.names or 'none'} ({plan.reasons.get('savers', '')})")
        plan.training.save_steps = save_steps or 10**6  # no checkpoint writes inside the measured steps
        plan.training.logging_steps = 1
        plan.save(path)
        return path, Plan.load(path)

    # runs -------------------------------------------------------------------------------------------------------
    def run_command(self, plan_path: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "loraplan.cli", "run", plan_path, "--overwrite", *extra]

    def run(self, plan_path: str, *extra: str, interrupt_after: Optional[str] = None) -> dict:
        """`loraplan run PLAN` in a fresh process; its summary.json read back. --dry-run checks the command instead.
        interrupt_after: a file whose appearance sends SIGINT to the run (the kill of resume_merge)."""
        from loraplan.executor.summary import RunSummary
        from loraplan.planner.planfile.schema import Plan

        argv = self.run_command(plan_path, *extra)
        if "--resume" in extra:
            argv.remove("--overwrite")
        plan = Plan.load(plan_path)
        row = {"command": " ".join(["loraplan"] + argv[3:]).replace(self.work, "$WORK")}
        if self.dry_run:
            check_command(argv, plan_path)
            return {**row, "exit": None}
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            if interrupt_after:
                while not _checkpoint_reached(interrupt_after) and proc.poll() is None:
                    if self.seconds_left() <= 0:
                        raise subprocess.TimeoutExpired(argv, time.monotonic() - t0)
                    time.sleep(0.2)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=max(5.0, self.seconds_left()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and any workers it started, nothing else
            proc.communicate()
            return {**row, "exit": "timeout", "error": f"killed after {time.monotonic() - t0:.0f} s (entry budget)"}
        row.update(exit=proc.returncode, wall_s=round(time.monotonic() - t0, 1))
        summary_path = os.path.join(plan.output_dir, "summary.json")
        if os.path.exists(summary_path):
            s = RunSummary.read(summary_path)
            row.update(status=s.status, observed_gib=s.observed_peak_gib, context_gib=s.cuda_context_gib,
                       tokens_per_s=s.tokens_per_s, observed_pinned_gib=s.observed_host_pinned_gib,
                       observed_per_gpu_gib=s.observed_peak_gib_per_gpu, host_peak_gib=s.host_peak_gib,
                       steps=s.steps, final_loss=s.final_loss, adapter_dir=s.adapter_dir, load_path=s.load_path,
                       load_peak_gib_per_process=s.load_peak_gib_per_process,
                       load_device_peak_gib_per_gpu=s.load_device_peak_gib_per_gpu)
        if proc.returncode not in (0, 130):
            row["error"] = (stderr or stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            row["error"] = row["error"][0]
        return row

    # rows -------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def case(self, name: str):
        """One case of an entry: a CheckError or Skip inside it becomes that case's row, and the entry goes on."""
        try:
            yield name
        except Skip as s:
            self.record(name, ok=None, skipped=str(s))
        except (CheckError, subprocess.TimeoutExpired) as err:
            self.record(name, ok=False, error=str(err))

    def record(self, case: str, plan=None, **fields) -> dict:
        """One row: the case, what the plan predicted, what was observed (fields), appended to the JSON file."""
        row = {"entry": self.entry.name, "case": case}
        if plan is not None:
            row.update(method=plan.method, batch=plan.training.micro_batch_size, seq=plan.training.seq_len,
                       grad_ckpt=plan.training.grad_checkpointing, loss=plan.training.loss,
                       backend=plan.training.backend, savers=plan.savers.names,
                       predicted_gib=plan.prediction.per_gpu_gib,
                       predicted_pinned_gib=plan.savers.pinned_host_gib or None,
                       predicted_tokens_per_s=plan.prediction.tokens_per_s)
        row.update(fields)
        if row.get("observed_gib") and row.get("predicted_gib"):
            row["error_pct"] = round(100 * (row["predicted_gib"] - row["observed_gib"]) / row["observed_gib"], 1)
        if "ok" not in row:
            row["ok"] = None if self.dry_run else row.get("exit") == 0
        self.rows.append(row)
        _append_json(os.path.join(self.out, "gpu_check.json"), row)
        print(json.dumps(row), flush=True)
        return row

    def run_and_record(self, case: str, plan_path: str, plan, *extra: str) -> dict:
        if not self.has_time():
            return self.record(case, plan, ok=False, exit="timeout", error="no time left in the entry's budget")
        return self.record(case, plan, **self.run(plan_path, *extra))


def check_command(argv: list[str], plan_path: str) -> None:
    """--dry-run's check of a run command: a `loraplan run` of a plan that exists and loads, with options `run` has."""
    from loraplan.cli import main as cli_main  # noqa: F401  (the CLI imports without the training stack)
    from loraplan.planner.planfile.schema import Plan

    if argv[1:4] != ["-m", "loraplan.cli", "run"] or argv[4] != plan_path or not os.path.exists(plan_path):
        raise CheckError(f"not a run of {plan_path}: {argv}")
    Plan.load(plan_path)
    known = {"--overwrite", "--resume", "--force", "--max-steps", "--memory-snapshot"}
    unknown = [a for a in argv[5:] if a.startswith("--") and a not in known]
    if unknown:
        raise CheckError(f"run has no option {unknown}")


def _last_line(proc) -> str:
    lines = ((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()
    return lines[-1] if lines else "no output"


def _append_json(path: str, row: dict) -> None:
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    rows.append(row)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)


def _child(args: list[str], timeout: float, what: str) -> str:
    """This script in a child process (its CUDA context dies with it); its stdout, or CheckError."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise CheckError(f"{what}: {_last_line(proc)}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# the entries, by value: peaks first

PEAK_SHAPES = (  # (architecture, method, batch, seq, checkpointing): both vocabularies, with and without checkpointing
    ("qwen2.5-0.5b", "lora", 4, 1024, "on"),
    ("qwen2.5-0.5b", "qlora", 4, 1024, "on"),
    ("llama-3.2-1b", "lora", 2, 2048, "off"),
    ("llama-3.2-1b", "qlora", 8, 1024, "on"),
)
SAVER_MODEL, SAVER_SHAPE = "llama-3.2-1b", ("lora", 4, 2048, "on")
SAVERS_CHECKED = (  # (saver, the package it needs beyond the run stack)
    ("offload_checkpoints", None),
    ("offload_activations", None),
    ("mlp_tiling", "liger_kernel"),
    ("padding_free", "flash_attn"),
)


@entry("peaks", 120, needs=RUN_STACK)
def peaks(ctx: Context) -> None:
    """LoRA and QLoRA peak memory at a few shapes: plan for this card, run, observed vs predicted."""
    for arch, method, batch, seq, ckpt in PEAK_SHAPES:
        reason = ctx.missing("bitsandbytes") if method == "qlora" else None
        if reason:
            ctx.record(f"{arch} {method}", ok=None, skipped=reason)
            continue
        with ctx.case(f"{arch} {method} {batch}x{seq} ckpt {ckpt}") as case:
            path, plan = ctx.plan(f"{arch}-{method}-{batch}x{seq}", ctx.model(arch), method, batch, seq, ckpt)
            ctx.run_and_record(case, path, plan)


@entry("savers", 120)
def savers(ctx: Context) -> None:
    """Each CUDA-only saver: the run completes; observed peak and pinned host memory against the plan."""
    method, batch, seq, ckpt = SAVER_SHAPE
    model = ctx.model(SAVER_MODEL)
    with ctx.case("no saver (reference)") as case:
        path, plan = ctx.plan("none", model, method, batch, seq, ckpt, "--savers", "none")
        ctx.run_and_record(case, path, plan)
    for saver, package in SAVERS_CHECKED:
        reason = ctx.missing(package) if package else None
        if reason:
            ctx.record(saver, ok=None, skipped=reason)
            continue
        with ctx.case(saver):
            path, plan = ctx.plan(saver, model, method, batch, seq, ckpt, "--savers", f"none,{saver.replace('_', '-')}=on",
                                  expect_savers=(saver,))
            row = ctx.run_and_record(saver, path, plan)
            if not ctx.dry_run and row.get("ok") and saver.startswith("offload") and not row.get("observed_pinned_gib"):
                row.update(ok=False, note="no pinned host memory observed: the offload did not happen")


@entry("recipes", 50, needs=RUN_STACK)
def recipes(ctx: Context) -> None:
    """The calibration's two recipes on one of its shapes: a plain PyTorch step beside trl's SFTTrainer (`loraplan
    run`, with what held its peak: the trl row the memory model misses most, held out)."""
    arch, method, batch, seq, ckpt = "qwen2.5-0.5b", "lora", 4, 2048, "on"  # both calibration rows of this shape
    model = ctx.model(arch)
    path, plan = ctx.plan("trl-sft", model, method, batch, seq, ckpt, "--loss", "fused", "--rank", "16")
    _run_with_snapshot(ctx, "trl-sft (SFTTrainer, fused loss)", path, plan)
    path, plan = ctx.plan("plain", model, method, batch, seq, ckpt, "--loss", "full", "--rank", "16")
    if plan.training.loss != "full":
        raise CheckError(f"--loss full gave a plan with loss {plan.training.loss}")
    if ctx.dry_run:
        ctx.record("plain step (model's own loss)", plan, command=f"gpu_check.py --plain-step {os.path.basename(path)}")
        return
    if not ctx.has_time():
        ctx.record("plain step (model's own loss)", plan, ok=False, exit="timeout", error="no time left")
        return
    t0 = time.monotonic()
    try:
        measured = json.loads(_child(["--plain-step", path], timeout=max(10.0, ctx.seconds_left()), what="plain step"))
        ctx.record("plain step (model's own loss)", plan, exit=0, wall_s=round(time.monotonic() - t0, 1), **measured)
    except (CheckError, subprocess.TimeoutExpired) as e:
        ctx.record("plain step (model's own loss)", plan, ok=False, exit=1, error=str(e))


SNAPSHOT_ROWS = (  # (architecture, batch, seq, checkpointing, dropout): the trl row issue 15 could not explain
    ("llama-3.2-1b", 2, 1024, "off", "0.05"),  # +13.6 %: measured below its own saved tensors
    ("llama-3.2-1b", 2, 1024, "off", "0"),  # ... and without the dropout masks
)


@entry("snapshots", 40, needs=RUN_STACK)
def snapshots(ctx: Context) -> None:
    """What held the peak of the trl row the memory model cannot explain (issue 15): `run --memory-snapshot` at the
    calibration recipe's shape (LoRA r=16 on the seven projections, trl's fused loss), with and without dropout."""
    for arch, batch, seq, ckpt, dropout in SNAPSHOT_ROWS:
        with ctx.case(f"{arch} trl lora {batch}x{seq} ckpt {ckpt} dropout {dropout}") as case:
            path, plan = ctx.plan(f"{arch}-{batch}x{seq}-{ckpt}-d{dropout}", ctx.model(arch), "lora", batch, seq, ckpt,
                                  "--loss", "fused", "--rank", "16", "--dropout", dropout)
            _run_with_snapshot(ctx, case, path, plan)


def _run_with_snapshot(ctx: Context, case: str, path: str, plan) -> dict:
    """`loraplan run --memory-snapshot` (executor/memory_snapshot.py): the row gains the peak's allocated and
    reserved bytes, the plan's terms, and the top groups of what held the peak (MiB); no peak file fails it."""
    from loraplan.executor.memory_snapshot import read_peak

    if not ctx.has_time():
        return ctx.record(case, plan, ok=False, exit="timeout", error="no time left in the entry's budget")
    row = ctx.run(path, "--memory-snapshot", str(ctx.steps))
    peak = None if ctx.dry_run else read_peak(plan.output_dir)
    if peak is not None:
        row.update(snapshot_peak_alloc_gib=round(peak["peak_bytes"] / 2**30, 3),
                   snapshot_max_reserved_gib=round(peak["max_reserved_bytes"] / 2**30, 3),
                   snapshot_groups=[(g["where"], round(g["bytes"] / 2**20, 1)) for g in peak["groups"][:12]])
    elif not ctx.dry_run and row.get("exit") == 0:
        row.update(ok=False, error="the run wrote no OUT/memory/peak-rank0.json")
    return ctx.record(case, plan, terms={k: round(v, 3) for k, v in plan.prediction.terms.items()}, **row)


@entry("resume_merge", 110, needs=RUN_STACK)
def resume_merge(ctx: Context) -> None:
    """Kill after a checkpoint, --resume, the same final adapter as an uninterrupted run; then merge."""
    model = ctx.model("qwen2.5-0.5b")
    steps, save = 40, 5
    ref_path, ref_plan = ctx.plan("reference", model, "lora", 2, 256, "on", steps=steps, save_steps=save)
    ctx.run_and_record("uninterrupted reference", ref_path, ref_plan)
    path, plan = ctx.plan("interrupted", model, "lora", 2, 256, "on", steps=steps, save_steps=save)
    if ctx.dry_run:
        ctx.record("killed after checkpoint-5", plan, **ctx.run(path))
        ctx.record("--resume", plan, **ctx.run(path, "--resume"))
        ctx.record("merge", plan, command="loraplan merge $WORK/runs/resume_merge-reference/adapter --output $WORK/merged --dtype fp32")
        return
    killed = ctx.run(path, interrupt_after=os.path.join(plan.output_dir, f"checkpoint-{save}", "COMPLETE"))
    ok = killed.get("exit") == 130 and killed.get("status") == "interrupted"
    ctx.record(f"killed after checkpoint-{save}", plan, **{**killed, "ok": ok})
    resumed = ctx.run(path, "--resume")
    row = ctx.record("--resume", plan, **resumed)
    ref_adapter = os.path.join(ref_plan.output_dir, "adapter")
    if row["ok"] and os.path.isdir(ref_adapter):
        diff = float(_child(["--adapter-diff", os.path.join(plan.output_dir, "adapter"), ref_adapter], timeout=60,
                            what="adapter diff"))
        row.update(adapter_max_abs_diff=diff, ok=diff < 1e-3 and resumed.get("steps") == steps)
        _append_json(os.path.join(ctx.out, "gpu_check.json"), {"entry": ctx.entry.name, "case": "adapter diff",
                                                               "adapter_max_abs_diff": diff, "ok": row["ok"]})
    merged = os.path.join(ctx.work, "merged")
    shutil.rmtree(merged, ignore_errors=True)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "loraplan.cli", "merge", ref_adapter, "--output", merged,
                           "--dtype", "fp32"], cwd=ROOT, capture_output=True, text=True,
                          timeout=max(10.0, ctx.seconds_left()))
    if proc.returncode != 0:
        ctx.record("merge", ok=False, exit=proc.returncode, error=_last_line(proc))
        return
    diff = float(_child(["--merge-diff", model, ref_adapter, merged], timeout=max(10.0, ctx.seconds_left()),
                        what="merged vs base + adapter"))
    ctx.record("merge", exit=0, wall_s=round(time.monotonic() - t0, 1), logits_max_rel_diff=diff, ok=diff < 1e-3)


@entry("unsloth", 70, needs=RUN_STACK + ("unsloth",))
def unsloth(ctx: Context) -> None:
    """The Unsloth backend beside the standard one on the same shapes: peak and tokens/s."""
    helped = subprocess.run([sys.executable, "-m", "loraplan.cli", "plan", "--help"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    if "--backend" not in helped:
        raise Skip("this loraplan has no `plan --backend` yet (issue 18)")
    for arch, method, batch, seq, ckpt in (PEAK_SHAPES[1], PEAK_SHAPES[0]):  # QLoRA first: Unsloth's own path
        model = ctx.model(arch)
        for backend in ("hf", "unsloth"):
            with ctx.case(f"{arch} {method} {batch}x{seq} {backend}") as case:
                path, plan = ctx.plan(f"{arch}-{method}-{backend}", model, method, batch, seq, ckpt, "--backend", backend)
                if plan.training.backend != backend:
                    raise CheckError(f"--backend {backend} gave a plan with backend {plan.training.backend}")
                ctx.run_and_record(case, path, plan)


@entry("fsdp_qlora_load", 60, needs=RUN_STACK + ("bitsandbytes",), min_gpus=2)
def fsdp_qlora_load(ctx: Context) -> None:
    """Two ranks, QLoRA under fsdp-offload (issue 13's loading path): per-GPU peak against the plan's training and
    load peaks."""
    arch, batch, seq = "llama-3.2-1b", 4, 1024
    with ctx.case(f"{arch} qlora fsdp-offload x2 {batch}x{seq}") as case:
        path, plan = ctx.plan(f"{arch}-qlora-fsdp-offload-x2", ctx.model(arch), "qlora", batch, seq, "on",
                              "--strategy", "fsdp-offload", num_gpus=2)
        if plan.strategy != "fsdp-offload" or plan.hardware.num_gpus != 2:
            raise CheckError(f"asked for fsdp-offload on 2 GPUs, the plan has {plan.strategy} on {plan.hardware.num_gpus}")
        row = ctx.run(path)
        if not ctx.dry_run and row.get("status") and row.get("load_path") != "layer-streamed":
            raise CheckError(f"the run loaded {row.get('load_path')}, not layer-streamed (executor/fsdp_load.py)")
        # load_peak_gib_per_process: the base weights each rank held while loading (fsdp_load.LoadTrace), beside the
        # plan's load figure in `loading` (its GPU side adds the CUDA context and the weight being quantized)
        ctx.record(case, plan, loading=plan.reasons.get("loading"), **row)


def _checkpoint_reached(complete: str) -> bool:
    """`complete` (OUT/checkpoint-N/COMPLETE) exists, or a later checkpoint is complete: the run keeps only its
    newest checkpoints (save_total_limit), so checkpoint-N may be rotated away between two polls on a fast machine."""
    from loraplan.executor.checkpoints import checkpoints

    if os.path.exists(complete):
        return True
    folder = os.path.dirname(complete)
    step = os.path.basename(folder).removeprefix("checkpoint-")
    return step.isdigit() and any(s > int(step) and whole for s, _, whole in checkpoints(os.path.dirname(folder)))


# ---------------------------------------------------------------------------------------------------------------
# child processes: build a model, a plain step, adapter and merge comparisons, the package probe


def _build(out_dir: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraplan.executor.tiny import build_tokenizer

    config = AutoConfig.from_pretrained(out_dir)
    with torch.device("cuda"):  # init on the GPU: far faster than on the CPU for a billion parameters
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    build_tokenizer().save_pretrained(out_dir)


def _plain_step(plan_path: str) -> None:
    """The calibration's plain recipe (tables/calibration/README.md) on the plan's model and shape: the model's own
    loss over the full vocabulary, autocast bf16, AdamW, three steps. Prints the observed peak the way `run` counts
    it: max reserved + the CUDA context (executor/device.py), and tokens/s over steps 2-3. On a machine without CUDA
    it runs the same steps on the CPU (the test of this code path) and prints no memory figures."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraplan.planner.planfile.schema import Plan

    plan = Plan.load(plan_path)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    context = 0
    if cuda:
        torch.zeros(1, device=device)
        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()
    quant = None
    if plan.method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(plan.model.path, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 quantization_config=quant, device_map={"": device})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=plan.lora.r, lora_alpha=plan.lora.lora_alpha,
                                             lora_dropout=plan.lora.lora_dropout, target_modules=plan.lora.target_modules,
                                             bias="none", task_type="CAUSAL_LM"))
    if plan.training.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    b, t = plan.training.micro_batch_size, plan.training.seq_len
    ids = torch.randint(0, model.config.vocab_size, (b, t), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    GIB = 2**30
    result = {"tokens_per_s": round(b * t / (sum(times[1:]) / 2), 1), "losses": [round(x, 4) for x in losses]}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        result.update(observed_gib=round((torch.cuda.max_memory_reserved() + context) / GIB, 3),
                      peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
                      context_gib=round(context / GIB, 3), device_used_end_gib=round((total - free) / GIB, 3))
    print(json.dumps(result))


def _adapter_diff(a: str, b: str) -> None:
    from safetensors.torch import load_file

    x, y = load_file(os.path.join(a, "adapter_model.safetensors")), load_file(os.path.join(b, "adapter_model.safetensors"))
    if x.keys() != y.keys():
        raise SystemExit("the adapters hold different tensors")
    print(max(float((x[k].float() - y[k].float()).abs().max()) for k in x))


def _merge_diff(base: str, adapter: str, merged: str) -> None:
    """Max |logits| difference between the merged model and base + adapter (peft) on one fixed batch, relative to the
    largest logit, in fp32 (bf16 rounding of the merged weights alone moves logits by about 2^-8 of their size), on
    the GPU (on the CPU without one)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, device_map={"": device})
        ids = (torch.arange(64, device=device).reshape(1, 64) * 7) % m.config.vocab_size
        got = m(input_ids=ids).logits.float()
        del m
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map={"": device})
        want = PeftModel.from_pretrained(base_model, adapter)(input_ids=ids).logits.float()
    print(float((got - want).abs().max() / want.abs().max()))


def _probe() -> None:
    """Which of PROBED import here (each in this one child process), and the GPU: JSON on stdout."""
    import importlib
    import importlib.metadata

    result: dict = {"imports": {}, "versions": {}}
    for name, dist in PROBED.items():
        try:
            importlib.import_module(name)
            result["imports"][name] = None
        except Exception as e:  # noqa: BLE001 - any failure to import is a reason to skip, recorded as such
            result["imports"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        try:
            result["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            result["versions"][dist] = None
    for dist in IMAGE_NEEDS:
        try:
            result["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            result["versions"][dist] = None
    from loraplan.planner.facts.hardware import detect_gpus, match_device_name

    found = detect_gpus()
    result["gpu"] = None if found is None else {"name": found[0], "memory_gib": round(found[1], 2), "count": found[2],
                                                "catalog": match_device_name(found[0])}
    print(json.dumps(result))


CHILDREN = {"--build": (_build, 1), "--plain-step": (_plain_step, 1), "--adapter-diff": (_adapter_diff, 2),
            "--merge-diff": (_merge_diff, 3), "--probe": (_probe, 0)}


# ---------------------------------------------------------------------------------------------------------------
# the driver


def write_dataset(path: str, rows: int = 128) -> str:
    """Plain text rows long enough to fill any seq_len (truncated to it), so every sequence is full length."""
    words = "the quick brown fox jumps over the lazy dog while bees make honey and grass is green".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(5000))}) + "\n")
    return path


def card_args_for(gpu: Optional[dict]) -> list[str]:
    """The plan flags for the card found: its catalog name with the memory it reports (what `--gpu auto` plans for),
    or its memory alone for a card the catalog does not know."""
    if gpu is None:
        return ["--gpu", DRY_RUN_CARD]
    memory = ["--gpu-memory", f"{gpu['memory_gib']}GiB"]
    return (["--gpu", gpu["catalog"]] if gpu.get("catalog") else []) + memory


def run_entries(ctx: Context, entries: list[Entry]) -> list[dict]:
    """Each entry in order, within its budget and the call's; one row of outcome per entry."""
    outcomes = []
    for e in entries:
        ctx.entry = e
        start = time.monotonic()
        ctx.entry_deadline = start + e.budget_s
        before = len(ctx.rows)
        outcome = {"entry": e.name, "budget_s": e.budget_s, "question": e.question}
        try:
            if ctx.gpus < e.min_gpus and not ctx.dry_run:
                raise Skip(f"needs {e.min_gpus} GPUs, this machine has {ctx.gpus}")
            if not ctx.dry_run and time.monotonic() > ctx.deadline - 15:
                raise Skip("the call's 9 minutes are spent")
            reason = ctx.missing(*e.needs)
            if reason:
                raise Skip(reason)
            e.fn(ctx)
            rows = ctx.rows[before:]
            bad = [r for r in rows if r.get("ok") is False]
            outcome["status"] = ("failed" if bad else "dry-run ok" if ctx.dry_run else
                                 "passed" if any(r.get("ok") for r in rows) else "skipped")
            if bad:
                outcome["reason"] = "; ".join(f"{r['case']}: {r.get('error') or r.get('note') or 'check failed'}" for r in bad)
        except Skip as s:
            outcome.update(status="skipped", reason=str(s))
        except (CheckError, subprocess.TimeoutExpired, OSError, ValueError) as err:
            outcome.update(status="failed", reason=f"{type(err).__name__}: {err}")
        outcome["wall_s"] = round(time.monotonic() - start, 1)
        outcomes.append(outcome)
        print(f"== {e.name}: {outcome['status']}" + (f" ({outcome['reason']})" if outcome.get("reason") else "")
              + f" in {outcome['wall_s']} s", flush=True)
    return outcomes


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown(header: dict, outcomes: list[dict], rows: list[dict]) -> str:
    lines = [f"# gpu_check {header['date']}", "",
             f"card: {header['card']}; " + ", ".join(f"{k} {v}" for k, v in header["versions"].items() if v), "",
             "| entry | status | s (budget) | reason |", "| --- | --- | --- | --- |"]
    for o in outcomes:
        lines.append(f"| {o['entry']} | {o['status']} | {o['wall_s']} ({o['budget_s']}) | {o.get('reason', '')} |")
    lines += ["", "| entry | case | predicted GiB | observed GiB | error | pinned pred / obs GiB | tok/s pred / obs | ok |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        err = f"{r['error_pct']:+.1f} %" if r.get("error_pct") is not None else (r.get("skipped") or r.get("error") or "")
        lines.append(f"| {r['entry']} | {r['case']} | {_fmt(r.get('predicted_gib'))} | {_fmt(r.get('observed_gib'))} | "
                     f"{err} | {_fmt(r.get('predicted_pinned_gib'))} / {_fmt(r.get('observed_pinned_gib'))} | "
                     f"{_fmt(r.get('predicted_tokens_per_s'), ',.0f')} / {_fmt(r.get('tokens_per_s'), ',.0f')} | "
                     f"{_fmt(r.get('ok'))} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CHILDREN:
        fn, n = CHILDREN[argv[0]]
        fn(*argv[1:1 + n])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated entries (default: all): " + ", ".join(e.name for e in ENTRIES))
    parser.add_argument("--dry-run", action="store_true", help="no GPU: build every plan and command and check them")
    parser.add_argument("--out", default=None, help="where gpu_check.json and gpu_check.md go (default: $OUT, else the work dir)")
    parser.add_argument("--work-dir", default=None, help="models and runs (default: a temp folder)")
    parser.add_argument("--budget", type=int, default=TOTAL_BUDGET_S, help=f"seconds for the whole call (default {TOTAL_BUDGET_S})")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per measured run (default 3)")
    args = parser.parse_args(argv)
    names = [e.name for e in ENTRIES]
    chosen = names if not args.only else args.only.split(",")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        print(f"Error: unknown entries {', '.join(unknown)}; known: {', '.join(names)}", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    work = args.work_dir or tempfile.mkdtemp(prefix="loraplan-gpu-check-")
    os.makedirs(work, exist_ok=True)
    out = args.out or os.environ.get("OUT") or work
    os.makedirs(out, exist_ok=True)
    probe = {"imports": {}, "versions": {}, "gpu": None}
    if not args.dry_run:
        probe = json.loads(_child(["--probe"], timeout=3 * PROBE_BUDGET_S, what="package probe"))
        if probe["gpu"] is None:
            print("gpu_check: no CUDA GPU visible (or torch missing); nothing to measure. "
                  "Run it on a GPU machine, or with --dry-run.")
            return 0
    ctx = Context(work=work, out=out, dry_run=args.dry_run, card_args=card_args_for(probe["gpu"]),
                  imports=probe["imports"], gpus=(probe["gpu"] or {}).get("count", 1), steps=args.steps,
                  deadline=t_start + args.budget)
    ctx.data = write_dataset(os.path.join(work, "data.jsonl"))
    header = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": args.dry_run,
              "card": probe["gpu"] or f"{DRY_RUN_CARD} (catalog; --dry-run)", "versions": probe["versions"],
              "imports": probe["imports"], "card_args": ctx.card_args}
    _append_json(os.path.join(out, "gpu_check.json"), {"header": header})
    print(json.dumps({"header": header}), flush=True)
    outcomes = run_entries(ctx, [e for e in ENTRIES if e.name in chosen])
    _append_json(os.path.join(out, "gpu_check.json"), {"outcomes": outcomes, "wall_s": round(time.monotonic() - t_start, 1)})
    text = markdown(header, outcomes, ctx.rows)
    with open(os.path.join(out, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 1 if any(o["status"] == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
