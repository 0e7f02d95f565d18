"""Issue 17, the executor's side: what a newcomer and an adversarial tester found in `loraplan run` and `merge`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import build_plan, data_file, one_line_error, requires_run, subprocess_env, wait_for_file, write_plan


def _run_cli(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "loraplan.executor.cli", "run", *map(str, args)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc/<pid>/task/*/children (psutil need not be installed)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for k in kids:
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# --- item 1: kill -9 of `loraplan run` itself --------------------------------------------------------------------

@requires_run
@pytest.mark.slow
def test_kill_9_of_the_run_takes_its_workers_with_it_and_resume_finishes(tiny_model_dir, tmp_path, cli_run):
    from loraplan.executor.lifetime import lock_holders

    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), strategy="ddp", num_gpus=2,
                      micro_batch_size=2, max_steps=60, save_steps=2, logging_steps=2, save_total_limit=2)
    path = write_plan(plan, tmp_path / "plan.yaml")
    proc = _run_cli(path)
    wait_for_file(out / "checkpoint-2" / "COMPLETE", proc, timeout=240)
    tree = _descendants(proc.pid)
    lock = str(out / ".loraplan.lock")
    workers = set(lock_holders(lock))
    assert len(workers) == 2 and workers <= tree, (workers, tree)  # each worker holds the folder's lock
    # a second run is refused while they train
    refused = cli_run(path, "--resume")
    assert refused.exit_code == 2 and "in use" in refused.stderr, refused.stderr

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while time.time() < deadline:
        holders = lock_holders(lock)
        alive = [p for p in tree if _alive(p)]
        if not holders:
            assert not alive, f"the lock is free while processes of the run live: {alive}"
            break
        time.sleep(0.02)
    assert not [p for p in tree if _alive(p)], "the run's processes outlived it"
    assert not lock_holders(lock)
    stopped = max(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-")
                  and os.path.exists(out / n / "COMPLETE"))
    time.sleep(1.0)  # nothing writes there any more: no new checkpoint appears
    assert stopped == max(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-")
                          and os.path.exists(out / n / "COMPLETE"))

    done = cli_run(path, "--resume")
    assert done.exit_code == 0, done.output + (out / "launch.log").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 60 and summary["resumed_from_step"] >= 2


# --- item 3: every plan field checked at load against one definition -----------------------------------------------

def test_lr_schedulers_are_transformers_scheduler_types():
    pytest.importorskip("transformers")
    from transformers.trainer_utils import SchedulerType

    from loraplan.planner.facts.options import LR_SCHEDULERS

    assert list(LR_SCHEDULERS) == [s.value for s in SchedulerType]


def test_attn_implementations_are_transformers_own():
    pytest.importorskip("transformers")
    from transformers import AttentionInterface

    from loraplan.planner.facts.options import ATTN_IMPLEMENTATIONS

    known = set(AttentionInterface._global_mapping) | {"eager"}
    assert set(ATTN_IMPLEMENTATIONS) <= known


@pytest.mark.parametrize("section, field, value, fragment", [
    ("training", "lr_scheduler", "warp", "training.lr_scheduler must be linear, cosine"),
    ("lora", "task_type", "SEQ_CLS", "lora.task_type must be CAUSAL_LM, not 'SEQ_CLS'"),
    ("training", "attn_implementation", "flash", "training.attn_implementation must be eager, sdpa"),
    ("lora", "bias", "some", "lora.bias must be none, all or lora_only"),
    ("quantization", "quant_type", "int4", "quantization.quant_type must be nf4 or fp4"),
    ("quantization", "compute_dtype", "fp8", "quantization.compute_dtype must be"),
    ("model", "source", "web", "model.source must be catalog"),
    ("model", "family", "", "model.family must be a non-empty string"),
    ("distributed", "quant_storage", "int8", "distributed.quant_storage must be"),
    ("distributed", "wrap_class", "Llama Layer", "distributed.wrap_class must be a class name"),
])
def test_a_hand_edited_field_is_refused_at_load_in_one_line(tmp_path, section, field, value, fragment):
    import yaml
    from click.testing import CliRunner

    from loraplan.executor.cli import run_command

    plan = build_plan(str(tmp_path / "model"), data_file("instruction.jsonl"), str(tmp_path / "out"))
    data = plan.to_dict()
    data[section][field] = value
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(run_command, [str(path)], catch_exceptions=False)
    one_line_error(result, 2, fragment)
    assert not (tmp_path / "out").exists()


# --- item 2: a plan's relative paths are relative to the plan file -----------------------------------------------

@requires_run
@pytest.mark.slow
def test_relative_paths_are_relative_to_the_plan_file_from_any_directory(tiny_model_dir, tmp_path, cli_run,
                                                                          monkeypatch):
    import shutil

    import yaml

    wf = tmp_path / "my work"
    wf.mkdir()
    shutil.copy(data_file("instruction.jsonl"), wf / "train.jsonl")
    data = build_plan(tiny_model_dir, data_file("instruction.jsonl"), "out", max_steps=4, save_steps=2,
                      logging_steps=2).to_dict()
    data["dataset"]["path"] = "train.jsonl"  # hand-edited, relative
    (wf / "plan.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    first = cli_run(wf / "plan.yaml")
    assert first.exit_code == 0, first.output
    out = wf / "out"
    assert (out / "adapter").is_dir() and not (elsewhere / "out").exists()
    copy = yaml.safe_load((out / "plan.yaml").read_text())
    assert copy["output_dir"] == "." and copy["dataset"]["path"] == os.path.join("..", "train.jsonl")

    os.unlink(out / "checkpoint-4" / "COMPLETE")
    shutil.rmtree(out / "adapter")
    monkeypatch.chdir(tmp_path)  # a third folder: the run's own copy of the plan still finds its folder and data
    resumed = cli_run(out / "plan.yaml", "--resume")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert not (tmp_path / "out").exists()


@requires_run
def test_resume_on_a_folder_without_a_run_is_refused(tiny_model_dir, tmp_path, cli_run):
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(tmp_path / "out"), max_steps=2)
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"), "--resume")
    one_line_error(result, 2, "nothing to resume in", "holds no checkpoint")
    assert not any(n.startswith("checkpoint-") for n in os.listdir(tmp_path / "out"))


def test_the_planner_writes_paths_relative_to_its_plan_file(tmp_path, monkeypatch):
    from loraplan.planner.planfile import paths as plan_paths

    monkeypatch.chdir(tmp_path)
    plan = build_plan(str(tmp_path / "model"), data_file("instruction.jsonl"), "out")
    plan.model.path = "model"
    plan_paths.save(plan, "plans/p.yaml")
    back = plan_paths.load(str(tmp_path / "plans" / "p.yaml"))
    assert back.output_dir == str(tmp_path / "out") and back.model.path == str(tmp_path / "model")
    raw = (tmp_path / "plans" / "p.yaml").read_text()
    assert "output_dir: ../out" in raw and f"path: {data_file('instruction.jsonl')}" in raw
    # written back where it came from, the file is unchanged byte for byte
    assert plan_paths.text_for(back, str(tmp_path / "plans" / "p.yaml")) == raw


def test_suggested_commands_are_shell_quoted(tmp_path, monkeypatch):
    import shlex

    from loraplan.planner.planfile.paths import resume_command

    monkeypatch.chdir(tmp_path)
    cmd = resume_command(str(tmp_path / "my runs" / "out"))
    assert cmd == "loraplan run 'my runs/out/plan.yaml' --resume"
    assert shlex.split(cmd)[2] == "my runs/out/plan.yaml"
    elsewhere = resume_command("/data/it's here/out")
    assert shlex.split(elsewhere)[2] == "/data/it's here/out/plan.yaml"


def test_plan_hint_is_shell_quoted(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from loraplan.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["plan", "llama-3.1-8b", "--gpu", "h100-80gb", "--no-fit-table",
                                       "--output", "my plans/p.yaml"])
    assert "run it with: loraplan run 'my plans/p.yaml'" in " ".join(result.output.split()), result.output


# --- item 10: the rows run drops are the rows plan counts as dropped -----------------------------------------------

@requires_run
def test_plan_counts_the_rows_run_drops_and_their_steps_agree(tiny_model_dir, tiny_tokenizer, tmp_path):
    from loraplan.executor.data import load_rows, tokenize_rows
    from loraplan.planner.api import PlanRequest, make_plan
    from loraplan.planner.facts.dataset_stats import dataset_stats

    path = tmp_path / "forty.jsonl"
    long_prompt = " ".join(f"word{i}" for i in range(120))  # alone far beyond 64 tokens
    rows = [{"instruction": long_prompt if i % 2 else f"say {i}", "output": f"answer {i}"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for tokenizer_dir in (tiny_model_dir, None):  # counted with the tokenizer, and estimated
        stats = dataset_stats(str(path), 64, tokenizer_dir=tokenizer_dir)
        assert stats.rows == 40 and stats.rows_dropped == 20 and stats.rows_trained == 20
    stats = dataset_stats(str(path), 64, tokenizer_dir=tiny_model_dir)
    data, fmt = load_rows(str(path), "auto")
    _, report = tokenize_rows(data, fmt, tiny_tokenizer, 64, str(path))
    assert (report.dropped, report.rows, report.tokens) == (stats.rows_dropped, stats.rows_trained, stats.tokens_total)

    res = make_plan(PlanRequest(model=tiny_model_dir, dataset=str(path), output_dir=str(tmp_path / "out"), gpu="cpu",
                                method="lora", rank=8, seq_len=64, batch_size=4, global_batch_size=4, epochs=1))
    assert res.plan.dataset.rows == 20  # the rows run trains on: 5 steps an epoch, not 10


# --- item 14: prompt/completion rows and a `datasets` save_to_disk folder ------------------------------------------

def _prompt_completion_rows():
    return [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(6)]


@requires_run
@pytest.mark.parametrize("shape", ["jsonl", "save_to_disk", "dataset_dict"])
def test_prompt_completion_and_save_to_disk_read_the_same_in_plan_and_run(shape, tiny_model_dir, tiny_tokenizer,
                                                                          tmp_path):
    import datasets

    from loraplan.executor.data import load_rows, tokenize_rows
    from loraplan.planner.facts.dataset_stats import dataset_stats

    rows = _prompt_completion_rows()
    if shape == "jsonl":
        path = tmp_path / "pc.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif shape == "save_to_disk":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        path = tmp_path / "saved_dict"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(path))
    stats = dataset_stats(str(path), 64, tokenizer_dir=tiny_model_dir)
    data, fmt = load_rows(str(path), "auto")
    assert fmt == stats.format == "prompt_completion" and len(data) == stats.rows == 6
    assert data == rows
    train, report = tokenize_rows(data, fmt, tiny_tokenizer, 64, str(path))
    assert report.tokens == stats.tokens_total and report.dropped == stats.rows_dropped == 0
    # completion-only loss: the prompt's tokens carry no label, the completion's and EOS do
    prompt_ids = tiny_tokenizer(rows[3]["prompt"])["input_ids"]
    labels = train[3]["labels"]
    assert labels[:len(prompt_ids)] == [-100] * len(prompt_ids)
    assert all(x != -100 for x in labels[len(prompt_ids):]) and labels[-1] == tiny_tokenizer.eos_token_id


def test_a_conversational_prompt_completion_row_is_refused_in_one_line(tmp_path):
    from loraplan.planner.facts.dataset_stats import dataset_stats
    from loraplan.planner.errors import InputError

    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "completion": "x"}) + "\n")
    with pytest.raises(InputError, match="line 1 has a conversational `prompt`"):
        dataset_stats(str(path), 64)


@requires_run
@pytest.mark.slow
def test_a_prompt_completion_save_to_disk_folder_trains(tiny_model_dir, tmp_path, cli_run):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(_prompt_completion_rows()).save_to_disk(str(folder))
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, str(folder), str(out), max_steps=2, save_steps=2, micro_batch_size=2)
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert json.loads((out / "dataset_fingerprint.json").read_text())["dataset"]["size"] > 0


# --- item 15: the eval row at the last step once; a symlink loop named ---------------------------------------------

@requires_run
@pytest.mark.slow
def test_the_eval_row_of_the_last_step_is_written_once(tiny_model_dir, tmp_path, cli_run):
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=4, save_steps=2,
                      logging_steps=2, micro_batch_size=2, eval_path=data_file("instruction.jsonl"))
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r["step"] for r in rows if r["kind"] == "eval"]
    assert evals == [2, 4], evals
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss"] == [r for r in rows if r["kind"] == "eval"][-1]["eval_loss"]


def test_a_symlink_loop_as_the_model_says_so(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from loraplan.cli import main

    monkeypatch.chdir(tmp_path)
    os.symlink("loop", "loop")
    for name in ("loop", "./loop"):
        result = CliRunner().invoke(main, ["plan", name, "--gpu", "cpu", "--no-fit-table"])
        one_line_error(result, 2, "is a symlink loop")


# --- item 9: merge ---------------------------------------------------------------------------------------------------

@requires_run
@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merge_defaults_to_the_plans_dtype_with_umask_modes_and_a_qlora_note(method, tiny_model_dir, tmp_path,
                                                                               cli_run):
    import stat

    from click.testing import CliRunner
    from safetensors import safe_open

    from loraplan.executor.cli import merge_command

    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), method=method, max_steps=2,
                      save_steps=2, micro_batch_size=2)  # a float32 plan
    assert cli_run(write_plan(plan, tmp_path / "plan.yaml")).exit_code == 0
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(merge_command, [str(out / "adapter"), "--output", str(tmp_path / "merged")],
                                    catch_exceptions=False)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert "dtype fp32 (the run's training.dtype, float32" in result.output
    assert ("trained against 4-bit (NF4) weights" in result.output) == (method == "qlora")
    modes = {n: stat.S_IMODE(os.stat(tmp_path / "merged" / n).st_mode) for n in os.listdir(tmp_path / "merged")}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype.is_floating_point
        import torch

        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


@requires_run
@pytest.mark.slow
def test_ctrl_c_during_merge_is_one_line_and_130(tiny_model_dir, tmp_path, cli_run):
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=2, save_steps=2,
                      micro_batch_size=2)
    assert cli_run(write_plan(plan, tmp_path / "plan.yaml")).exit_code == 0
    proc = subprocess.Popen([sys.executable, "-m", "loraplan.executor.cli", "merge", str(out / "adapter"), "--output",
                             str(tmp_path / "merged")], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while True:  # inside the merge: torch is being imported (then transformers, peft: seconds)
        assert proc.poll() is None and time.time() < deadline
        try:
            if "libtorch" in open(f"/proc/{proc.pid}/maps").read():
                break
        except OSError:
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert stderr.strip().splitlines()[-1].startswith("Error: interrupted; nothing was saved"), stderr
    assert "Aborted" not in stderr + stdout and "saved to" not in stdout
    assert not (tmp_path / "merged").exists() or not os.listdir(tmp_path / "merged")


# --- item 7: machine 1 waits for machine 0 in words, and not forever ------------------------------------------------

@requires_run
@pytest.mark.slow
def test_machine_1_without_machine_0_times_out_in_one_line_and_leaves_nothing(tiny_model_dir, tmp_path):
    import glob
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), strategy="fsdp", num_gpus=1,
                      num_nodes=2, micro_batch_size=2, max_steps=2, save_steps=2)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "loraplan-machine-1-*")))
    t0 = time.monotonic()
    proc = _run_cli(write_plan(plan, tmp_path / "plan.yaml"), "--machine-rank", 1, "--main-process-ip", "127.0.0.1",
                    "--main-process-port", port, "--rendezvous-timeout", 3)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, (stdout, stderr)
    assert f"waiting for machine 0 at 127.0.0.1:{port}" in " ".join(stdout.split())
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: machine 0 did not answer at 127.0.0.1:{port} within 3 s")
    assert time.monotonic() - t0 < 60
    assert not out.exists()  # the wait made it, and removed it
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "loraplan-machine-1-*"))) == before
    assert not _descendants(proc.pid)


@requires_run
def test_the_rendezvous_timeout_reaches_the_launcher(tiny_model_dir, tmp_path):
    from loraplan.executor.launch import Rendezvous, launch_command

    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(tmp_path / "out"), strategy="ddp",
                      num_gpus=1, num_nodes=2)
    cmd, _ = launch_command(plan, "p.yaml", None, "e.json", Rendezvous(1, "10.0.0.1", 29500, "flags", timeout_s=42))
    assert cmd[cmd.index("--rdzv_conf") + 1] == "timeout=42"
    # and accelerate's launcher takes it as torchrun's own rendezvous setting
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(cmd[3:])
    assert args.rdzv_conf == "timeout=42"


def test_a_worker_whose_launcher_is_already_gone_never_starts(tmp_path):
    """bind_worker's check of the chain run -> launcher -> worker (the race before the parent-death signal is
    armed): here the child's parent is this test process, whose parent is the pid it is told is the run's."""
    code = "from loraplan.executor.lifetime import bind_worker; bind_worker(); print('alive')"
    for run_pid, alive in ((os.getppid(), True), (1, False)):
        env = {**subprocess_env(), "LORAPLAN_RUN_PID": str(run_pid)}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert (done.stdout.strip() == "alive") == alive and done.returncode == (0 if alive else 1), done
