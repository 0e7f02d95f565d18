"""Rich tables for `loraplan plan`: the same facts as --json, laid out for people."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from .api import PlanResult

GIB = 2**30


def _n(x: int) -> str:
    return f"{x:,}"


def _hours(h: float) -> str:
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} days"


def render(res: PlanResult, console: Console) -> None:
    plan, a = res.plan, res.arch
    t = plan.training

    arch = Table(title=f"Model: {res.model.display_name}", box=box.SIMPLE_HEAVY, show_header=False, title_justify="left")
    arch.add_column(style="bold")
    arch.add_column()
    arch.add_row("family", f"{a.family} ({plan.model.source}{': ' + plan.model.path if plan.model.path else ''})")
    arch.add_row("parameters", f"{_n(a.total_params)} ({a.total_params / 1e9:.2f} B)")
    arch.add_row("layers x hidden", f"{a.num_layers} x {a.hidden_size}, intermediate {a.intermediate_size}")
    arch.add_row("attention", f"{a.num_heads} heads, {a.num_kv_heads} kv heads, head_dim {a.head_dim}")
    arch.add_row("vocabulary", f"{_n(a.vocab_size)}{' (tied embeddings)' if a.tie_word_embeddings else ''}")
    if a.is_moe:
        arch.add_row("experts", f"{a.num_experts}, {a.experts_per_token} per token, expert size {a.moe_intermediate_size}")
    console.print(arch)

    ad = Table(title=f"LoRA adapter: r={plan.lora.r}, alpha={plan.lora.lora_alpha}, dropout={plan.lora.lora_dropout}",
               box=box.SIMPLE_HEAVY, title_justify="left")
    for col in ("module", "shape (in x out)", "copies", "params each", "% of layer", "trainable", "% of model"):
        ad.add_column(col, justify="left" if col in ("module", "shape (in x out)") else "right")
    for p in res.selection.projections:
        lp = p.lora_params(plan.lora.r)
        shape = f"{p.in_features} x {p.out_features}" + (f" x {p.experts} experts" if p.experts > 1 else "")
        ad.add_row(p.peft_name, shape, str(p.count), _n(lp // p.count), f"{100 * lp / p.weight_params:.2f} %", _n(lp),
                   f"{100 * lp / a.total_params:.3f} %")
    ad.add_row("[bold]total", "", "", "", "", f"[bold]{_n(res.trainable_params)}",
               f"[bold]{100 * res.trainable_params / a.total_params:.3f} %")
    console.print(ad)

    mem = Table(title=f"Memory per GPU: {plan.hardware.gpu_name}, {plan.hardware.memory_gib:.1f} GiB",
                box=box.SIMPLE_HEAVY, title_justify="left")
    mem.add_column("term")
    mem.add_column("GiB", justify="right")
    mem.add_column("formula", style="dim")
    for term in res.terms:
        mem.add_row(term.name, f"{term.gib:.2f}", term.formula)
    total = res.per_gpu_gib
    label = "predicted peak (nvidia-smi)" if plan.hardware.gpu != "cpu" else "predicted peak (process memory)"
    mem.add_row(f"[bold]{label}", f"[bold]{total:.2f}", "")
    head = plan.hardware.memory_gib - total
    colour = "green" if res.feasible else "red"
    mem.add_row(f"[{colour}]headroom", f"[{colour}]{head:.2f}", f"usable {res.usable_gib:.1f} GiB after a {plan.prediction.margin:.0%} margin")
    console.print(mem)

    dec = Table(title="Decision", box=box.SIMPLE_HEAVY, title_justify="left")
    dec.add_column("setting", style="bold")
    dec.add_column("value")
    dec.add_column("why")
    r = plan.reasons
    dec.add_row("method", plan.method.upper(), r.get("method", ""))
    dec.add_row("gradient checkpointing", "on" if t.grad_checkpointing else "off", r.get("grad_checkpointing", ""))
    dec.add_row("micro-batch", str(t.micro_batch_size), r.get("micro_batch_size", ""))
    dec.add_row("gradient accumulation", str(t.grad_accum_steps), r.get("grad_accum_steps", ""))
    dec.add_row("strategy", plan.strategy, r.get("strategy", ""))
    dec.add_row("learning rate", f"{t.learning_rate:g}", r.get("learning_rate", ""))
    dec.add_row("epochs", f"{t.num_epochs:g}" if t.max_steps < 0 else f"max_steps {t.max_steps}", r.get("num_epochs", ""))
    dec.add_row("warmup", f"{t.warmup_ratio:.0%}, {t.lr_scheduler}", r.get("warmup_ratio", ""))
    dec.add_row("sequence length", str(t.seq_len), "")
    dec.add_row("loss / optimizer", f"{t.loss} / {t.optimizer}", plan.assumptions.get("loss", ""))
    if "targets" in r:
        dec.add_row("targets", ", ".join(plan.lora.target_modules + plan.lora.target_parameters), r["targets"])
    console.print(dec)

    est = res.estimate
    if est.get("tokens_per_s"):
        line = f"Expected throughput: {est['tokens_per_s']:,.0f} tokens/s over {plan.hardware.num_gpus} GPU(s)"
        if est.get("hours"):
            line += f"; {est['train_tokens']:,} training tokens take about {_hours(est['hours'])}"
        console.print(line + f"  [dim]({est['basis']}, MFU {est['mfu']:.0%})[/dim]")
    if res.dataset is not None:
        d = res.dataset
        console.print(f"Dataset: {d.path}: {d.rows:,} rows, {d.format} format, {'about ' if d.estimated else ''}"
                      f"{d.tokens_total:,} tokens ({d.basis}), {d.rows_over_seq_len} rows longer than {t.seq_len}")

    if res.fit_table:
        ft = Table(title="Across the catalog's cards (same request)", box=box.SIMPLE_HEAVY, title_justify="left")
        for col in ("card", "memory GiB", "fits", "method", "micro-batch", "checkpointing", "peak GiB", "headroom GiB", "tokens/s"):
            ft.add_column(col, justify="left" if col in ("card", "fits", "method") else "right")
        for row in res.fit_table:
            ok = row["fits"]
            ft.add_row(
                row["gpu"], f"{row['memory_gib']:.1f}", "[green]yes" if ok else "[red]no",
                (row["method"] or "").upper() if ok else "-", str(row["micro_batch_size"]) if ok else "-",
                ("on" if row["grad_checkpointing"] else "off") if ok else "-",
                f"{row['per_gpu_gib']:.1f}", f"{row['headroom_gib']:.1f}",
                f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else "-",
            )
        console.print(ft)

    if res.hardware_note:
        console.print(f"[dim]{res.hardware_note}[/dim]")
    if res.feasible:
        console.print(f"[bold green]FITS[/bold green] on {plan.hardware.num_gpus} x {plan.hardware.gpu_name}: "
                      f"{total:.1f} of {plan.hardware.memory_gib:.1f} GiB per GPU, {head:.1f} GiB headroom")
    else:
        console.print(f"[bold red]DOES NOT FIT[/bold red] on {plan.hardware.gpu_name}. What would:")
        for s in res.suggestions:
            console.print(f"  - {s}")
