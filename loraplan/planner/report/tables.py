"""Rich tables for `loraplan plan`: the same facts as --json, laid out for people."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..plugins.savers import SAVERS
from .result import PlanResult



def new_table(title: str, **kw) -> Table:
    """The style of every table loraplan prints: a rule under the header, no outer edge, two spaces between
    columns, so that the plan's tables fit an 80-column terminal without cutting a name or a number."""
    return Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left", show_edge=False, pad_edge=False,
                 collapse_padding=True, **kw)


def key_column(table: Table, header: str, **kw) -> None:
    """A column of names or numbers: never wrapped, never cut (a multi-line header keeps it narrow)."""
    table.add_column(header, no_wrap=True, **kw)


def text_column(table: Table, header: str, **kw) -> None:
    """A column of prose (reasons, formulas): wraps at spaces, and folds a word longer than the column rather
    than cutting it with an ellipsis."""
    table.add_column(header, overflow="fold", **kw)


def min_width(console: Console, table: Table) -> int:
    """The narrowest the table renders without cutting: key columns at their widest cell, prose columns at
    their longest word, plus padding and rules (rich's own column measurement, which ignores no_wrap)."""
    wide = console.options.update_width(10_000)
    cols = [table._measure_column(console, wide, c) for c in table.columns]
    return sum(m.maximum if c.no_wrap else m.minimum for m, c in zip(cols, table.columns)) + table._extra_width


def print_table(console: Console, table: Table) -> None:
    """Print a table so that nothing in it is cut. Key columns do not wrap and prose columns take the squeeze;
    on a console narrower than the key columns alone need, the table keeps that minimum width and its lines run
    past the edge (the terminal wraps them) instead of rich cropping names and numbers to fit."""
    need = min_width(console, table)
    if need > console.width:
        table.width = need
        console.print(table, crop=False)
    else:
        console.print(table)
    console.print()


def _n(x: int) -> str:
    return f"{x:,}"


def _hours(h: float) -> str:
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} days"


def terms_table(title: str, terms) -> Table:
    """A budget's rows: term, GiB, formula (the memory table, the host tables)."""
    t = new_table(title)
    key_column(t, "term")
    key_column(t, "GiB", justify="right")
    text_column(t, "formula", style="dim")
    for term in terms:
        t.add_row(term.name, f"{term.gib:.2f}", term.formula)
    return t


def _host_and_strategies(res: PlanResult, console: Console) -> None:
    """What lives in host memory (offload), and every strategy tried side by side when there were several."""
    host = [t for t in res.terms if t.device == "host"]
    if host:
        print_table(console, terms_table(
            f"Host memory per process (of {res.plan.hardware.host_memory_gib:,.0f} GiB per node)", host))
    if len(res.strategies) > 1:
        st = new_table("Strategies tried (same request)")
        for col in ("strategy", "fits", "method", "micro-\nbatch", "grad\nckpt", "peak\nGiB", "load\nGiB",
                    "host\nGiB", "tokens/s", "moved\nGB/step"):
            key_column(st, col, justify="left" if col in ("strategy", "fits", "method") else "right")
        text_column(st, "why (not)")
        chosen = next((o for o in res.strategies if o.strategy == res.plan.strategy), None)
        for o in res.strategies:
            c = o.choice
            st.add_row(o.strategy, "[green]yes" if o.fits else "[red]no", c.method.upper(), str(c.micro_batch_size),
                       "on" if c.grad_checkpointing else "off", f"{c.peak_gib:.1f}", f"{o.load.gpu_gib:.1f}",
                       f"{o.host_gib:.0f}", f"{o.tokens_per_s:,.0f}" if o.tokens_per_s else "-",
                       f"{o.moved_gb:,.1f}" if o.moved_gb is not None else "-", _why(o, chosen))
        print_table(console, st)

def _why(o, chosen) -> str:
    """One strategy's row: why it was chosen, or not."""
    if not o.fits:
        return o.why_not or ""
    if o is chosen:
        return "chosen (Decision, strategy)"
    if chosen is None or not (o.tokens_per_s and chosen.tokens_per_s):
        return "fits"
    if o.tokens_per_s > chosen.tokens_per_s:
        return f"faster by the estimate, but within its error band of {chosen.strategy}, which moves less"
    return f"fits, slower than {chosen.strategy} by the estimate"


def _savers_tables(res: PlanResult, console: Console) -> None:
    """Pinned host memory, and what each saver of the plan buys (GPU GiB saved, host GiB, slowdown)."""
    effects = res.saver_effects()
    if res.host_terms:
        r = res.resolved
        host = terms_table(f"Host memory: {r.host_note}, {r.usable_host_gib:.1f} GiB usable for pinned memory",
                           res.host_terms)
        over = res.host_gib - r.usable_host_gib
        host.caption = ("pinned (page-locked) host memory the offload holds for the step; the process itself needs more"
                        + (f"; {over:.1f} GiB over the usable share" if over > 0 else ""))
        host.caption_justify = "left"
        print_table(console, host)
    if not effects:
        return
    buys = new_table("What each saver buys on this plan")
    key_column(buys, "saver")
    for col in ("GPU GiB\nsaved", "host\nGiB", "slowdown"):
        key_column(buys, col, justify="right")
    text_column(buys, "how `run` applies it (speed figure)")
    for e in effects:
        how = e.speed_source.split(":", 1)[0]  # derived | cited: the sources are in --json and tables/savers.yaml
        buys.add_row(e.name, f"{e.gib_saved:.2f}", f"{e.host_gib:.2f}", f"{e.slowdown - 1:+.1%}",
                     f"{SAVERS[e.name].applied_short} ({how})")
    buys.caption = "slowdown: time per token against the same plan without that saver; sources: --json, tables/savers.yaml"
    buys.caption_justify = "left"
    print_table(console, buys)


def render(res: PlanResult, console: Console) -> None:
    """The plan for people, table by table in reading order: what is trained, what it costs, what was decided,
    how fast, the same request on every card, and the verdict."""
    _model_table(res, console)
    _adapter_table(res, console)
    _memory_table(res, console)
    _savers_tables(res, console)
    _decision_table(res, console)
    _host_and_strategies(res, console)
    _estimate_lines(res, console)
    _backends_table(res, console)
    _fit_table(res, console)
    _verdict(res, console)


def _backends_table(res: PlanResult, console: Console) -> None:
    """The same request under each training backend (planner.decision.backend_compare), on a one-GPU plan."""
    if not res.backends:
        return
    table = new_table("Backends (same request)")
    key_column(table, "backend")
    key_column(table, "peak", justify="right")
    key_column(table, "longest\ncontext", justify="right")
    key_column(table, "tokens/s", justify="right")
    text_column(table, "needs installed")
    notes = []
    for row in res.backends:
        chosen = " *" if row.backend == res.plan.training.backend else ""
        if row.refused:
            table.add_row(row.backend + chosen, "-", "-", "-", escape(f"refused: {row.refused}"))
            continue
        peak = f"{row.peak_gib:.2f} GiB" + ("" if row.feasible else " (no fit)")
        longest = f"{row.longest_context:,}" if row.longest_context else "none"
        tps = "-" if row.tokens_per_s is None else f"{row.tokens_per_s:,.0f}"
        if row.speedup and row.tokens_per_s is not None:
            tps += " \u2020"
            notes.append(escape(f"\u2020 {row.speed_basis}: x{row.speedup:g} on loraplan's estimate ({row.speed_source})"))
        table.add_row(row.backend + chosen, peak, longest, tps, escape(row.needs))
    print_table(console, table)
    for note in notes:
        console.print(f"[dim]{note}[/dim]")
    if notes:
        console.print()


def _model_table(res: PlanResult, console: Console) -> None:
    """The architecture as counted: family and source, parameters, layers, attention, vocabulary, experts."""
    plan, a = res.plan, res.arch
    arch = new_table(f"Model: {res.model.display_name}", show_header=False)
    key_column(arch, "", style="bold")
    text_column(arch, "")
    arch.add_row("family", f"{a.family} ({plan.model.source}{': ' + plan.model.path if plan.model.path else ''})")
    arch.add_row("parameters", f"{_n(a.total_params)} ({a.total_params / 1e9:.2f} B)")
    arch.add_row("layers x hidden", f"{a.num_layers} x {a.hidden_size}, intermediate {a.intermediate_size}")
    arch.add_row("attention", f"{a.num_heads} heads, {a.num_kv_heads} kv heads, head_dim {a.head_dim}")
    arch.add_row("vocabulary", f"{_n(a.vocab_size)}{' (tied embeddings)' if a.tie_word_embeddings else ''}")
    if a.is_moe:
        arch.add_row("experts", f"{a.num_experts}, {a.experts_per_token} per token, expert size {a.moe_intermediate_size}")
    print_table(console, arch)


def _adapter_table(res: PlanResult, console: Console) -> None:
    """The LoRA adapter module by module: shape, copies, parameters each and in all, shares of layer and model."""
    plan, a = res.plan, res.arch
    ad = new_table(f"LoRA adapter: r={plan.lora.r}, alpha={plan.lora.lora_alpha}, dropout={plan.lora.lora_dropout}")
    key_column(ad, "module")
    text_column(ad, "shape\n(in x out)")  # wraps between its numbers: "2048 x 1536" / "x 128 experts"
    for col in ("copies", "params\neach", "% of\nlayer", "trainable", "% of\nmodel"):
        key_column(ad, col, justify="right")
    for p in res.selection.projections:
        lp = p.lora_params(plan.lora.r)
        shape = f"{p.in_features} x {p.out_features}" + (f" x {p.experts} experts" if p.experts > 1 else "")
        ad.add_row(p.peft_name, shape, str(p.count), _n(lp // p.count), f"{100 * lp / p.weight_params:.2f} %", _n(lp),
                   f"{100 * lp / a.total_params:.3f} %")
    ad.add_row("[bold]total", "", "", "", "", f"[bold]{_n(res.trainable_params)}",
               f"[bold]{100 * res.trainable_params / a.total_params:.3f} %")
    print_table(console, ad)


def _memory_table(res: PlanResult, console: Console) -> None:
    """The GPU terms with their formulas, the predicted peak, and the headroom (or what is short)."""
    plan = res.plan
    mem = terms_table(f"Memory per GPU: {plan.hardware.gpu_name}, {plan.hardware.memory_gib:.1f} GiB",
                      [t for t in res.terms if t.device == "gpu"])
    total = res.per_gpu_gib
    label = "predicted peak (nvidia-smi)" if plan.hardware.gpu != "cpu" else "predicted peak (process memory)"
    mem.add_row(f"[bold]{label}", f"[bold]{total:.2f}", "")
    head = plan.hardware.memory_gib - total
    if res.feasible:
        mem.add_row("[green]headroom", f"[green]{head:.2f}", f"usable {res.usable_gib:.1f} GiB after a {plan.prediction.margin:.0%} margin")
    elif total <= res.usable_gib and res.host_terms:  # the card holds it; the host's pinned memory does not
        mem.add_row("[yellow]headroom", f"[yellow]{head:.2f}", "the card holds it; the pinned host memory is short "
                    "(Host memory, below)")
    elif total <= res.usable_gib:  # training fits; the plan does not for another reason (loading, host memory)
        binds = next((o.binds for o in res.strategies if o.strategy == plan.strategy), None) or "something else"
        mem.add_row("[yellow]headroom", f"[yellow]{head:.2f}", f"training fits the usable {res.usable_gib:.1f} GiB; "
                    f"{binds} does not (Decision, below)")
    else:  # fitting needs peak <= usable: a positive "headroom" against the whole card would read as room to spare
        mem.add_row("[red]short", f"[red]{total - res.usable_gib:.2f}",
                    f"over the usable {res.usable_gib:.1f} GiB ({plan.hardware.memory_gib:.1f} GiB less a "
                    f"{plan.prediction.margin:.0%} margin)")
    print_table(console, mem)


def _decision_table(res: PlanResult, console: Console) -> None:
    """Each setting the plan decided, its value and why (the closest configuration when nothing fits)."""
    plan, t = res.plan, res.plan.training
    dec = new_table("Decision" if res.feasible else "Closest configuration tried (does not fit)")
    key_column(dec, "setting", style="bold")
    text_column(dec, "value")  # short words, except a long target list, which wraps at its commas
    text_column(dec, "why")
    r = plan.reasons
    dec.add_row("method", plan.method.upper(), r.get("method", ""))
    dec.add_row("gradient checkpointing", "on" if t.grad_checkpointing else "off", r.get("grad_checkpointing", ""))
    dec.add_row("micro-batch", str(t.micro_batch_size), r.get("micro_batch_size", ""))
    dec.add_row("gradient accumulation", str(t.grad_accum_steps), r.get("grad_accum_steps", ""))
    dec.add_row("strategy", plan.strategy, r.get("strategy", ""))
    dec.add_row("learning rate", f"{t.learning_rate:g}", r.get("learning_rate", ""))
    dec.add_row("epochs", f"{t.num_epochs:g}" if t.max_steps < 0 else f"max_steps {t.max_steps}", r.get("num_epochs", ""))
    dec.add_row("warmup", f"{t.warmup_ratio:.0%}, {t.lr_scheduler}", r.get("warmup_ratio", ""))
    dec.add_row("sequence length", str(t.seq_len), r.get("seq_len", ""))
    if "savers" in r:
        names = plan.savers.names
        value = ", ".join(f"every {plan.savers.every_n_layers} layers" if n == "layer_checkpointing" else n
                          for n in names) or "none"
        dec.add_row("memory savers", value, r["savers"])
    dec.add_row("loss / optimizer", f"{t.loss} / {t.optimizer}", plan.assumptions.get("loss", ""))
    if "targets" in r:
        dec.add_row("targets", ", ".join(plan.lora.target_modules + plan.lora.target_parameters), r["targets"])
    for key, label in (("loading", "loading"), ("quantization", "quantization")):
        if key in r:
            dec.add_row(label, res.load.mode if key == "loading" and res.load else "", r[key])
    print_table(console, dec)


def _estimate_lines(res: PlanResult, console: Console) -> None:
    """Expected throughput (and training time), and the dataset's rows and tokens, one line each."""
    plan, est = res.plan, res.estimate
    if est.tokens_per_s:
        line = f"Expected throughput: {est.tokens_per_s:,.0f} tokens/s over {plan.hardware.world_size} GPU(s)"
        if est.hours:
            line += f"; {est.train_tokens:,} training tokens take about {_hours(est.hours)}"
        console.print(line + f"  [dim]({est.basis}, MFU {est.mfu:.0%})[/dim]")
    if res.dataset is not None:
        d = res.dataset
        console.print(f"Dataset: {d.path}: {d.rows:,} rows, {d.format} format, {'about ' if d.estimated else ''}"
                      f"{d.tokens_total:,} tokens ({d.basis}), {d.rows_over_seq_len} rows longer than {plan.training.seq_len}"
                      + (f", {d.rows_dropped} of them dropped (the prompt alone fills {plan.training.seq_len} tokens: "
                         f"nothing left to train on)" if d.rows_dropped else ""))


def _fit_table(res: PlanResult, console: Console) -> None:
    """The same request on every catalog card; without the columns a savers or longest-context table can spare
    when the full one is wider than the terminal."""
    if not res.fit_table:
        return
    if res.estimate.tokens_per_s or res.dataset is not None:
        console.print()
    longest = any(row.longest_seq_len is not None for row in res.fit_table)
    with_savers = any(row.savers is not None for row in res.fit_table)
    ft = _fit_rows(res, narrow=False)
    if (longest or with_savers) and min_width(console, ft) > console.width:
        ft = _fit_rows(res, narrow=True)
    print_table(console, ft)


def _fit_rows(res: PlanResult, narrow: bool) -> Table:
    """The fit table; `narrow` leaves out the columns a savers/longest-context table can spare."""
    margin = res.plan.prediction.margin
    longest = any(row.longest_seq_len is not None for row in res.fit_table)
    with_savers = any(row.savers is not None for row in res.fit_table)
    many = res.plan.hardware.world_size > 1  # the strategy can differ from card to card
    spare = {"micro-\nbatch", "grad\nckpt", "host\nGiB", "headroom\nGiB"} if narrow else set()
    ft = new_table("Across the catalog's cards (same request" + (", each at its longest context)" if longest else ")"))
    cols = ["card", "memory\nGiB", "fits"] + (["longest\ncontext"] if longest else []) + (
        ["strategy"] if many else []) + ["method", "micro-\nbatch", "grad\nckpt"] + (["savers", "host\nGiB"] if with_savers else []) + [
        "peak\nGiB", "headroom\nGiB", "tokens/s"]
    cols = [c for c in cols if c not in spare]
    for col in cols:
        key_column(ft, col, justify="left" if col in ("card", "fits", "method", "savers", "strategy") else "right")
    short = False
    for row in res.fit_table:
        cell, row_short = _fit_cells(row, margin)
        short = short or row_short
        ft.add_row(*[cell[c] for c in cols])
    captions = []
    if short:
        captions.append(f"peak: the smallest configuration tried where it does not fit; short: GiB over the "
                        f"usable memory (the card's less a {margin:.0%} safety margin)")
    if narrow:
        captions.append("micro-batch, checkpointing, host GiB and headroom: --json, or a wider terminal")
    if captions:
        ft.caption, ft.caption_justify = "\n".join(captions), "left"
    return ft


def _fit_cells(row, margin: float) -> tuple[dict[str, str], bool]:
    """(every column's cell for one card, whether its headroom cell reads "short")."""
    ok = row.fits
    short = False
    if ok:
        room = f"{row.headroom_gib:.1f}"
    elif row.binds in ("loading", "host memory"):  # training fits there; loading or the host does not
        room = f"{row.binds} binds"
    else:  # what it lacks against the usable memory, the bound fitting is judged by
        room = f"short {row.per_gpu_gib - row.memory_gib * (1 - margin):.1f}"
        short = True
    return {
        "card": row.gpu, "memory\nGiB": f"{row.memory_gib:.1f}", "fits": "[green]yes" if ok else "[red]no",
        "longest\ncontext": f"{row.longest_seq_len:,}" if row.longest_seq_len else "-",
        "strategy": row.strategy or "-", "method": (row.method or "").upper() if ok else "-",
        "micro-\nbatch": str(row.micro_batch_size) if ok else "-",
        "grad\nckpt": ("on" if row.grad_checkpointing else "off") if ok else "-",
        "savers": ("+".join(SAVERS[n].short for n in row.savers or []) or "-") if ok else "-",
        "host\nGiB": f"{row.host_gib:.1f}" if ok and row.host_gib else "-",
        "peak\nGiB": f"{row.per_gpu_gib:.1f}", "headroom\nGiB": room,
        "tokens/s": f"{row.tokens_per_s:,.0f}" if row.tokens_per_s else "-",
    }, short


def _gpus(hw) -> str:
    """The world the plan trains on, in words that match --json's world_size: "16 x H100 (2 nodes x 8)"."""
    nodes = f" ({hw.num_nodes} nodes x {hw.num_gpus})" if hw.num_nodes > 1 else ""
    return f"{hw.world_size} x {hw.gpu_name}{nodes}"


def _verdict(res: PlanResult, console: Console) -> None:
    """The hardware note and warnings, then FITS (peak, headroom) or DOES NOT FIT with what would."""
    plan, t = res.plan, res.plan.training
    if res.hardware_note:
        console.print(f"[dim]{res.hardware_note}[/dim]")
    for warning in res.warnings:
        console.print(f"[bold yellow]warning:[/bold yellow] {warning}")
    if res.feasible:
        total = res.per_gpu_gib
        head = plan.hardware.memory_gib - total
        longest = f"the longest context, {t.seq_len:,} tokens, " if res.resolved is not None and res.resolved.seq_len_max else ""
        savers = (f", with {', '.join(plan.savers.names)}" if plan.savers.names else "")
        host = f" and {res.host_gib:.1f} GiB of pinned host memory" if res.host_terms else ""
        console.print(f"[bold green]FITS[/bold green]{': ' + longest.rstrip(', ') if longest else ''} on "
                      f"{_gpus(plan.hardware)}{savers}: {total:.1f} of "
                      f"{plan.hardware.memory_gib:.1f} GiB per GPU{host}, {head:.1f} GiB headroom")
    else:
        console.print(f"[bold red]DOES NOT FIT[/bold red] on {plan.hardware.gpu_name}. What would:")
        for s in res.suggestions:
            console.print(f"  - {s}")
