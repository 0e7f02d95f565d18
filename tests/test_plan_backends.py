"""`plan --backend`: the Unsloth entry's terms reach the plan's budget, its defaults and refusals apply, every family
of the catalog plans under it or is refused with a reason, and a one-GPU plan shows both backends side by side
(planner/plugins/backends.py, planner/decision/backend_compare.py). No training library needed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import subprocess_env
from loraplan.planner.api import PlanRequest, make_plan
from loraplan.planner.errors import InputError
from loraplan.planner.plugins.backends import BACKENDS
from loraplan.tables import TABLES_DIR, load_table

GIB, MIB = 2**30, 2**20
H, L = 4096, 32  # Llama 3.1 8B: hidden size, layers


def _plan(*args):
    proc = subprocess.run([sys.executable, "-m", "loraplan.cli", "plan", *args, "--no-fit-table"], capture_output=True,
                          text=True, timeout=120, env=subprocess_env())
    return proc


def _json(*args):
    proc = _plan(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_unsloths_terms_reach_the_plans_budget_by_hand():
    T = 8192  # micro-batch 1 x 8192 tokens
    d = _json("llama-3.1-8b", "--gpu", "rtx-4090", "--method", "qlora", "--backend", "unsloth", "--seq-len", str(T),
              "--batch-size", "1", "--grad-checkpointing", "on")
    terms = d["memory"]["terms"]
    # offloaded checkpointing: only the last layer's input stays on the GPU, bf16: 2 B x h x T; two copy-back buffers
    assert terms["offloaded_checkpoints"] == pytest.approx(2 * H * T / GIB)
    assert terms["copy_back_buffers"] == pytest.approx(2 * 2 * H * T / GIB)
    assert "checkpointed_inputs" not in terms and "chunked_loss" in terms and "fused_loss" not in terms
    assert d["memory"]["per_gpu_gib"] == pytest.approx(sum(terms.values()))
    # the other layers' inputs in pinned host memory: the 50 MiB pool + L power-of-two blocks of 2 B x h x T (64 MiB)
    assert d["savers"]["host"]["terms"]["pinned_checkpoints"] == pytest.approx((200 * 256 * 1024 + L * 64 * MIB) / GIB)
    assert d["training"]["backend"] == "unsloth" and d["plan"]["training"]["backend"] == "unsloth"
    # the same request under hf has none of them
    hf = _json("llama-3.1-8b", "--gpu", "rtx-4090", "--method", "qlora", "--seq-len", str(T), "--batch-size", "1",
               "--grad-checkpointing", "on")
    assert "offloaded_checkpoints" not in hf["memory"]["terms"] and "checkpointed_inputs" in hf["memory"]["terms"]
    assert hf["training"]["backend"] == "hf"


def test_unsloths_dropout_default_and_what_a_dropout_costs():
    base = ("llama-3.1-8b", "--gpu", "rtx-4090", "--method", "qlora", "--backend", "unsloth", "--seq-len", "8192",
            "--batch-size", "1", "--grad-checkpointing", "on")
    zero = _json(*base)
    assert zero["adapter"]["lora_dropout"] == 0.0 and "unsloth" in zero["decision"]["reasons"]["dropout"]
    assert not [w for w in zero["warnings"] if "--dropout" in w]
    masked = _json(*base, "--dropout", "0.05")
    warning = next(w for w in masked["warnings"] if w.startswith("--dropout 0.05 under --backend unsloth"))
    # the masks: the difference of the two plans' activations and allocator terms, as the warning says it
    extra = sum(masked["memory"]["terms"][k] - zero["memory"]["terms"][k] for k in ("activations", "allocator_reserve"))
    assert extra > 0 and f"{extra:.2f} GiB more" in warning
    assert masked["memory"]["formulas"]["activations"].endswith("X_u = 18h + 4kv + 5i (fused, dropout masks)")


@pytest.mark.parametrize("args, fragment", [
    (("--gpu", "h100-80gb", "--num-gpus", "2", "--strategy", "fsdp"), "shards the model (FSDP)"),
    (("--gpu", "rtx-4090", "--savers", "offload-checkpoints=on"), "offloads the checkpointed layer inputs"),
    (("--gpu", "rtx-4090", "--savers", "mlp-tiling=on"), "tiles the MLP itself"),
    (("--gpu", "rtx-4090", "--savers", "layer-checkpointing=on"), "checkpoints every decoder layer"),
])
def test_refusals_are_one_line_exit_2(args, fragment):
    proc = _plan("llama-3.1-8b", "--backend", "unsloth", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr
    assert lines[0].startswith("Error: --backend unsloth")


def test_seq_len_max_under_unsloth_never_picks_a_saver_it_refuses():
    d = _json("llama-3.1-8b", "--gpu", "rtx-4090", "--method", "qlora", "--backend", "unsloth", "--seq-len", "max",
              "--host-memory", "256GiB")
    assert d["savers"]["chosen"] == [] and d["training"]["seq_len"] > 8192
    rows = {r["backend"]: r for r in d["backends"]}
    assert rows["unsloth"]["longest_context"] == d["training"]["seq_len"]


def test_the_side_by_side_is_in_json_with_the_published_speed_labelled():
    d = _json("unsloth/Meta-Llama-3.1-8B", "--gpu", "rtx-4090", "--method", "qlora", "-r", "16")
    rows = {r["backend"]: r for r in d["backends"]}
    assert list(rows) == list(BACKENDS)
    hf, un = rows["hf"], rows["unsloth"]
    assert hf["peak_gib"] == pytest.approx(d["memory"]["per_gpu_gib"])  # the plan itself is hf's
    assert un["peak_gib"] != hf["peak_gib"] and un["longest_context"] and hf["longest_context"]
    published = load_table("backends.yaml")["unsloth"]
    alone = _json("unsloth/Meta-Llama-3.1-8B", "--gpu", "rtx-4090", "--method", "qlora", "-r", "16", "--backend", "unsloth")
    assert alone["memory"]["per_gpu_gib"] == pytest.approx(un["peak_gib"])
    # the factor applies to loraplan's estimate of Unsloth's own configuration
    assert un["speedup"] == published["speedup"] == 2.0
    assert un["tokens_per_s"] == pytest.approx(alone["estimate"]["tokens_per_s"] * 2.0)
    assert un["speed_basis"] == "Unsloth's published speed-up, not measured here" and "github.com/unslothai" in un["speed_source"]
    assert hf["speed_basis"] == "loraplan's estimate" and hf["speedup"] is None
    assert "loraplan[unsloth]" in un["needs"]
    text = _plan("unsloth/Meta-Llama-3.1-8B", "--gpu", "rtx-4090", "--method", "qlora", "-r", "16").stdout
    assert "Backends (same request)" in text and "not measured here" in text
    # not where it does not help: several GPUs, or the CPU
    assert _json("llama-3.1-8b", "--gpu", "h100-80gb", "--num-gpus", "2")["backends"] == []
    assert _json("qwen2.5-0.5b", "--gpu", "cpu")["backends"] == []


def test_every_catalog_family_plans_under_unsloth_or_is_refused_with_a_reason():
    models = yaml.safe_load((TABLES_DIR / "models.yaml").read_text())
    first = {}
    for name, entry in models.items():
        first.setdefault(entry["config"].get("model_type"), name)
    outcomes = {}
    for family, name in first.items():
        try:
            res = make_plan(PlanRequest(model=name, gpu="h200", backend="unsloth", fit_table=False))
            assert res.plan.training.backend == "unsloth"
            outcomes[family] = "plans"
        except InputError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("--backend unsloth"), exc
            outcomes[family] = "refused"
    assert outcomes["llama"] == outcomes["qwen3"] == outcomes["phi3"] == "plans"
    # MoE experts are parameters, which Unsloth's get_peft_model does not take: refused, and planned without them
    assert outcomes["qwen3_moe"] == "refused"
    res = make_plan(PlanRequest(model="qwen3-30b-a3b", gpu="h200", backend="unsloth", targets="q,k,v,o", fit_table=False))
    assert res.plan.training.backend == "unsloth"


def test_a_plan_file_under_unsloth_round_trips_and_fsdp_is_refused_at_load(tmp_path):
    from loraplan.planner.errors import PlanError
    from loraplan.planner.planfile.schema import Plan

    res = make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", method="qlora", backend="unsloth", fit_table=False))
    path = tmp_path / "plan.yaml"
    res.plan.save(str(path))
    back = Plan.load(str(path))
    assert back.training.backend == "unsloth" and back.lora.lora_dropout == 0.0
    data = yaml.safe_load(path.read_text())
    data["strategy"] = "fsdp"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match="cannot train this plan"):
        Plan.load(str(path))
