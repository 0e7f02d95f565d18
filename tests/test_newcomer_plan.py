"""The planner's side of issue 17 ("What a newcomer found in the third trial"): multi-node words, more GPUs that
are slower, the strategy a practitioner would take, configs transformers refuses, the default global batch and
sequence length, eval-set flags, and the catalog commands' help. Each test failed before its fix."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from loraplan.cli import main

SMALL_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
               "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
               "vocab_size": 1000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "initializer_range": 0.02}


def cli(*args):
    return CliRunner().invoke(main, list(args))


def plan_json(*args):
    res = cli("plan", *args, "--json", "--no-fit-table")
    assert res.exit_code in (0, 1), res.output
    return json.loads(res.output)


def write_config(tmp_path, raw: str = None, **fields):
    cfg = dict(SMALL_LLAMA, **fields)
    path = tmp_path / "config.json"
    path.write_text(raw if raw is not None else json.dumps(cfg))
    return str(path)


# 4. multi-node: the words match --json's world_size


@pytest.mark.parametrize("gpu,gpus,nodes", [("h100", 8, 2), ("rtx-4090", 1, 2)])
def test_multi_node_reports_name_the_whole_world(gpu, gpus, nodes):
    args = ("plan", "llama-3.1-8b", "--gpu", gpu, "--num-gpus", str(gpus), "--num-nodes", str(nodes), "--no-fit-table")
    j = plan_json(*args[1:-1])
    world = j["hardware"]["world_size"]
    assert world == gpus * nodes
    text = cli(*args).output
    assert f"FITS on {world} x " in text and f"({nodes} nodes x {gpus})" in text
    t = j["plan"]["training"]
    accum = j["decision"]["reasons"]["grad_accum_steps"]
    assert t["grad_accum_steps"] * t["micro_batch_size"] * world == t["global_batch_size"]
    assert accum.startswith(f"{t['grad_accum_steps']} = global batch {t['global_batch_size']} / "
                            f"(micro-batch {t['micro_batch_size']} x {world} GPU(s))")


# 11. the default global batch fits the world size


def test_the_default_global_batch_is_rounded_up_to_the_world_and_says_so():
    j = plan_json("llama-3.1-8b", "--gpu", "h100", "--num-gpus", "8", "--num-nodes", "4")
    assert j["plan"]["training"]["global_batch_size"] == 32
    assert "the default 16 rounded up to a multiple of the 32 GPUs" in j["decision"]["reasons"]["grad_accum_steps"]
    j = plan_json("llama-3.1-8b", "--gpu", "h100", "--num-gpus", "3")
    assert j["plan"]["training"]["global_batch_size"] == 18
    # a global batch the user names is theirs: it still must divide
    res = cli("plan", "llama-3.1-8b", "--gpu", "h100", "--num-gpus", "8", "--num-nodes", "4",
              "--global-batch-size", "16")
    assert res.exit_code == 2 and "--global-batch-size 16 is not divisible by 32 GPUs" in res.output


# 12. the default sequence length and the model's context


def test_the_default_length_is_the_models_context_when_shorter(tmp_path):
    cfg = write_config(tmp_path, max_position_embeddings=512)
    j = plan_json(cfg, "--gpu", "rtx-4090")
    assert j["plan"]["training"]["seq_len"] == 512
    assert "max_position_embeddings" in j["decision"]["reasons"]["seq_len"]
    assert not any("beyond the model's max_position_embeddings" in w for w in j["warnings"])
    # asked for: kept, with the warning
    j = plan_json(cfg, "--gpu", "rtx-4090", "--seq-len", "2048")
    assert j["plan"]["training"]["seq_len"] == 2048 and j["warnings"]
    # a longer context keeps the default
    assert plan_json("llama-3.1-8b", "--gpu", "h100")["plan"]["training"]["seq_len"] == 2048


# 8 and 12. configs transformers refuses (checked without importing it), each in one line naming the field


@pytest.mark.parametrize("fields,raw,needle", [
    ({"hidden_size": 130, "head_dim": 16}, None, "'hidden_size' (130) must be a multiple of num_attention_heads (8)"),
    ({"rope_scaling": "linear"}, None, "'rope_scaling' must be a dict"),
    ({"rope_scaling": {"rope_type": "linear"}}, None, "'rope_scaling' (rope_type 'linear') is missing 'factor'"),
    ({"rope_scaling": {"rope_type": "warp", "factor": 2.0}}, None, "rope_type 'warp'"),
    ({}, json.dumps(SMALL_LLAMA).replace('"initializer_range": 0.02', '"initializer_range": NaN'),
     "'initializer_range' must be finite"),
    ({"initializer_range": 3.0}, None, "'initializer_range' must be in [0, 1]"),
    ({"rms_norm_eps": "tiny"}, None, "'rms_norm_eps' must be a number"),
    ({"hidden_size": 120, "head_dim": 15}, None, "'head_dim' (15) must be even"),
    ({"max_position_embeddings": 0}, None, "'max_position_embeddings' must be a positive integer, got 0"),
    ({"max_position_embeddings": -4}, None, "'max_position_embeddings' must be a positive integer, got -4"),
])
def test_configs_transformers_refuses_are_refused_in_one_line(tmp_path, fields, raw, needle):
    res = cli("plan", write_config(tmp_path, raw, **fields), "--gpu", "rtx-4090", "--no-fit-table")
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output


@pytest.mark.parametrize("fields", [
    {"hidden_size": 130, "head_dim": 16},
    {"rope_scaling": "linear"},
    {"rope_scaling": {"rope_type": "linear"}},
    {"hidden_size": 120, "head_dim": 15},
    {"rms_norm_eps": "tiny"},
])
def test_what_the_check_refuses_transformers_refuses_too(fields):
    """The check mirrors transformers: the same config fails to build a LlamaConfig (so `run` would fail)."""
    transformers = pytest.importorskip("transformers")
    with pytest.raises(Exception):
        transformers.LlamaConfig(**dict(SMALL_LLAMA, **fields))


def test_every_catalog_model_and_a_valid_config_pass_the_checks(tmp_path):
    from loraplan.planner.config_checks import check_config
    from loraplan.tables import models

    for key, entry in models().items():
        check_config(dict(entry["config"]), key)
    assert cli("plan", write_config(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0}),
               "--gpu", "rtx-4090", "--no-fit-table").exit_code == 0


# 13. eval-set flags


def test_eval_flags_fill_the_plans_dataset(tmp_path):
    ev = tmp_path / "eval.jsonl"
    ev.write_text('{"instruction": "a", "output": "b"}\n')
    j = plan_json("llama-3.1-8b", "--gpu", "rtx-4090", "--dataset", "tests/data/instruction.jsonl",
                  "--eval-path", str(ev))
    assert j["plan"]["dataset"]["eval_path"] == str(ev) and j["plan"]["dataset"]["eval_fraction"] == 0
    j = plan_json("llama-3.1-8b", "--gpu", "rtx-4090", "--dataset", "tests/data/instruction.jsonl",
                  "--eval-fraction", "0.25")
    assert j["plan"]["dataset"]["eval_fraction"] == 0.25 and j["plan"]["dataset"]["eval_path"] is None
    out = tmp_path / "plan.yaml"
    assert cli("plan", "llama-3.1-8b", "--gpu", "rtx-4090", "--dataset", "tests/data/instruction.jsonl",
               "--eval-path", str(ev), "-o", str(out)).exit_code == 0
    from loraplan.planner.plan import Plan

    assert Plan.load(str(out)).dataset.eval_path == str(ev)


@pytest.mark.parametrize("args,needle", [
    (["--eval-fraction", "1"], "--eval-fraction must be in [0, 1), got 1.0"),
    (["--eval-fraction", "-0.1"], "--eval-fraction must be in [0, 1)"),
    (["--eval-fraction", "nan"], "--eval-fraction must be in [0, 1)"),
    (["--eval-path", "/no/such/eval.jsonl"], "eval dataset not found: /no/such/eval.jsonl"),
    (["--eval-path", "tests/data/chat.jsonl"], "has no `instruction`"),  # not the training data's format
    (["--eval-path", "tests/data/empty.jsonl"], "is empty"),
    (["--eval-path", "tests/data/instruction.jsonl", "--eval-fraction", "0.1"], "give one"),
])
def test_bad_eval_flags_are_refused_in_one_line(args, needle):
    res = cli("plan", "llama-3.1-8b", "--gpu", "rtx-4090", "--dataset", "tests/data/instruction.jsonl", *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_eval_flags_need_a_dataset():
    res = cli("plan", "llama-3.1-8b", "--gpu", "rtx-4090", "--eval-fraction", "0.1")
    assert res.exit_code == 2 and "--eval-fraction needs --dataset" in res.output


# 15. the catalog commands' help


@pytest.mark.parametrize("command", ["models", "gpus"])
def test_catalog_commands_explain_json(command):
    res = cli(command, "--help")
    line = next(x for x in res.output.splitlines() if "--json" in x)
    assert "JSON" in line


# 5. more GPUs that are slower: said, with one node's figure and what would help


def test_two_nodes_slower_than_one_say_so_with_one_nodes_figure():
    one = plan_json("mixtral-8x7b", "--gpu", "h100", "--num-gpus", "8")
    two = plan_json("mixtral-8x7b", "--gpu", "h100", "--num-gpus", "8", "--num-nodes", "2")
    assert two["estimate"]["tokens_per_s"] < one["estimate"]["tokens_per_s"]
    warning = next(w for w in two["warnings"] if "fewer than" in w)
    assert f"{one['estimate']['tokens_per_s']:,.0f} on one node" in warning  # the same estimate function
    assert "--network ib-ndr-8x" in warning and "within a node" in warning
    assert two["plan"]["warnings"] == two["warnings"]
    text = cli("plan", "mixtral-8x7b", "--gpu", "h100", "--num-gpus", "8", "--num-nodes", "2", "--no-fit-table").output
    assert "fewer than" in " ".join(text.split())
    assert not any("fewer than" in w for w in one["warnings"])


# 6. the strategy a practitioner would take: within the error band, the one that moves less


def test_a_model_that_fits_one_card_trains_ddp_not_offload():
    j = plan_json("llama-3.1-8b", "--gpu", "rtx-4090", "--num-gpus", "2")
    opts = {o["strategy"]: o for o in j["strategies"]}
    assert j["plan"]["strategy"] == "ddp"
    assert opts["ddp"]["moved_gb_per_step"] < opts["fsdp-offload"]["moved_gb_per_step"]
    reason = j["decision"]["reasons"]["strategy"]
    assert "error band" in reason and "moves less" in reason
    text = cli("plan", "llama-3.1-8b", "--gpu", "rtx-4090", "--num-gpus", "2", "--no-fit-table").output
    assert "moved" in text and "GB/step" in text and "chosen" in text


def test_offload_copies_and_collectives_add_up_and_only_their_excess_is_exposed():
    from loraplan.planner.communication import StepTime

    from loraplan.planner.api import PlanRequest, make_plan

    res = make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", num_gpus=2, strategy="fsdp-offload",
                                fit_table=False))
    e = res.estimate
    chain = e.collective_s_per_step + e.offload_s_per_step
    layers = res.arch.num_layers
    assert e.exposed_s_per_step == pytest.approx(chain / layers + max(0.0, chain * (1 - 1 / layers) - e.compute_s_per_step))
    # DDP: only the last micro-step's backward hides the all-reduce
    st = StepTime(10.0, 3.0, 0.0, "x", exposed_s=1.0)
    assert st.step_s == 11.0
