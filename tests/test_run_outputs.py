"""The output folder is the user's: one run at a time holds it, a run writes only its own files, and faults from
the environment (a folder that cannot be made, a full disk, truncated weights) end in one line, with nothing lost."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import build_plan, data_file, one_line_error, requires_run, subprocess_env, write_plan

pytestmark = requires_run


def _snapshot(folder) -> dict:
    """Every file under FOLDER with its bytes' hash (and inode: a rewrite by rename changes it)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_ino)
    return out


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fails the test if a model is loaded: the checks under test must come first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output folder was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _user_project(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("# my project\n\nNotes I keep.\n")
    (folder / "notes.txt").write_text("do not touch\n")
    return folder


# --- a folder loraplan did not make ----------------------------------------------------------------------------


def test_a_project_folder_is_refused_and_left_as_it_was(tiny_model_dir, tmp_path, cli_run, monkeypatch, no_model_load):
    """`run plan.yaml --output-dir .` in a project folder: refused before anything is written."""
    project = _user_project(tmp_path / "project")
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), "out", max_steps=2)
    write_plan(plan, project / "plan.yaml")
    before = _snapshot(project)
    monkeypatch.chdir(project)
    line = one_line_error(cli_run("plan.yaml", "--output-dir", "."), 2, "output dir . is not empty",
                           "not made by loraplan", "README.md", "--use-existing-dir")
    assert "plan.yaml" in line
    # Even with the flag, the user's plan.yaml is a name the run writes: refused rather than rewritten.
    one_line_error(cli_run("plan.yaml", "--output-dir", ".", "--use-existing-dir"), 2, "already holds plan.yaml",
                    "loraplan did not write")
    # --overwrite does not make it loraplan's either.
    one_line_error(cli_run("plan.yaml", "--output-dir", ".", "--overwrite"), 2, "not made by loraplan")
    assert _snapshot(project) == before
    assert sorted(os.listdir(project)) == ["README.md", "notes.txt", "plan.yaml"]  # no lock or marker left behind


@pytest.mark.slow
def test_use_existing_dir_writes_beside_the_users_files(tiny_model_dir, tmp_path, cli_run):
    folder = _user_project(tmp_path / "runs")
    before = _snapshot(folder)
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(folder), max_steps=2, save_steps=2)
    path = write_plan(plan, tmp_path / "plan.yaml")
    result = cli_run(path, "--use-existing-dir")
    assert result.exit_code == 0, result.output
    after = _snapshot(folder)
    assert {k: after[k] for k in before} == before  # README.md (not trl's model card) and notes.txt untouched
    assert (folder / "adapter" / "adapter_config.json").exists() and (folder / ".loraplan-run.json").exists()
    assert not (folder / ".loraplan.lock").exists()
    # The folder is loraplan's now: --overwrite replaces the run and still only the run.
    result = cli_run(path, "--overwrite")
    assert result.exit_code == 0, result.output
    after = _snapshot(folder)
    assert {k: after[k] for k in before} == before
    assert (folder / "summary.json").exists()


@pytest.mark.slow
def test_a_run_writes_no_model_card_and_an_empty_folder_is_free(tiny_model_dir, tmp_path, cli_run):
    out = tmp_path / "empty"
    out.mkdir()
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=4, save_steps=2)
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    # Only the run's own names at the top (trl's README.md model card is not written; peft's stays in adapter/).
    from loraplan.executor import run_files

    names = set(os.listdir(out))
    assert "README.md" not in names
    assert names <= set(run_files.RUN_NAMES) | {run_files.MARKER_FILE, "checkpoint-2", "checkpoint-4"}, names
    assert {run_files.MARKER_FILE, "adapter", "checkpoint-2", "checkpoint-4", "plan.yaml", "summary.json"} <= names
    assert (out / "adapter" / "adapter_config.json").exists()
    # A README.md the user adds later survives --overwrite.
    (out / "README.md").write_text("mine\n")
    assert cli_run(write_plan(plan, tmp_path / "plan.yaml"), "--overwrite").exit_code == 0
    assert (out / "README.md").read_text() == "mine\n"


@pytest.mark.slow
def test_resume_from_the_folders_own_plan_leaves_it_byte_identical(tiny_model_dir, tmp_path, cli_run, monkeypatch):
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), "out", max_steps=4, save_steps=2)
    # Where `loraplan plan -o out/plan.yaml` puts it: a folder holding only the plan being run is the run's.
    out.mkdir()
    write_plan(plan, out / "plan.yaml")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(out)["plan.yaml"]
    result = cli_run("out/plan.yaml")
    assert result.exit_code == 0, result.output
    assert _snapshot(out)["plan.yaml"] == before
    result = cli_run("out/plan.yaml", "--resume")
    assert result.exit_code == 0, result.output
    assert _snapshot(out)["plan.yaml"] == before  # same bytes, same inode: not rewritten


# --- one run at a time ----------------------------------------------------------------------------------------


def _wait_for_lock(out, proc, timeout=180.0) -> dict:
    lock = out / ".loraplan.lock"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended early: {proc.communicate()}")
        if lock.exists() and (out / "metrics.jsonl").exists():
            text = lock.read_text()
            if text.strip():
                return json.loads(text)
        time.sleep(0.2)
    raise AssertionError("the first run never took its lock")


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused(tiny_model_dir, tmp_path, cli_run):
    out = tmp_path / "out"
    long_plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=100000,
                           save_steps=100000, logging_steps=1)
    path = write_plan(long_plan, tmp_path / "a.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "loraplan.executor.cli", "run", path], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        holder = _wait_for_lock(out, proc)
        assert holder["pid"] == proc.pid and "loraplan run" in holder["command"]
        plan_before = (out / "plan.yaml").read_bytes()
        # A short twin of the running plan (so that, were the lock broken, these would end rather than train on).
        twin = write_plan(build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=2,
                                     save_steps=100000, logging_steps=1), tmp_path / "twin.yaml")
        for extra in ((), ("--overwrite",), ("--resume",)):
            line = one_line_error(cli_run(twin, *extra), 2, f"output dir {out} is in use by", f"pid {proc.pid}",
                                   "--output-dir")
        other = build_plan(tiny_model_dir, data_file("text.jsonl"), str(out), max_steps=2, learning_rate=1e-3)
        line = one_line_error(cli_run(write_plan(other, tmp_path / "b.yaml")), 2, "is in use by")
        assert "loraplan run" in line
        assert (out / "plan.yaml").read_bytes() == plan_before  # plan B's plan did not land beside A's run
        assert proc.poll() is None  # the first run was not disturbed
    finally:
        proc.send_signal(signal.SIGKILL)  # killed outright: its lock file stays, its lock does not
        proc.wait()
    assert (out / ".loraplan.lock").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)  # one writer: steps in order
    short = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=2, save_steps=2)
    result = cli_run(write_plan(short, tmp_path / "c.yaml"), "--overwrite")
    assert result.exit_code == 0, result.output  # a stale lock file does not block
    assert not (out / ".loraplan.lock").exists()


# --- faults from the environment ---------------------------------------------------------------------------------


def _unwritable_places(tmp_path):
    """Folders that cannot be created: under a regular file, under /proc, and under a read-only folder (as root,
    chmod does not stop writes, so that case uses /proc/self instead)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        (readonly / "probe").mkdir()
        (readonly / "probe").rmdir()
        ro_case = ("/proc/self/loraplan-out", "/proc")  # root: a virtual folder that takes no new entries
    except PermissionError:
        ro_case = (str(readonly / "out"), "not writable")
    return [(str(blocker / "out"), "is a file, not a folder"), ("/proc/loraplan-test/out", "/proc"), ro_case]


def test_an_output_dir_that_cannot_be_made_is_one_line(tiny_model_dir, tmp_path, cli_run, monkeypatch, no_model_load):
    import loraplan.executor.tiny

    monkeypatch.setattr(loraplan.executor.tiny, "build_tiny_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("demo model built first")))
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), "unused", max_steps=2)
    path = write_plan(plan, tmp_path / "plan.yaml")
    try:
        for folder, cause in _unwritable_places(tmp_path):
            one_line_error(cli_run(path, "--output-dir", folder), 2, f"cannot create output dir {folder}", cause)
            one_line_error(cli_run("--demo", "--output-dir", folder), 2, f"cannot create output dir {folder}", cause)
        one_line_error(cli_run(path, "--output-dir", tmp_path / "a-file"), 2, "exists and is not a directory")
    finally:
        (tmp_path / "readonly").chmod(0o755)


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_complete_one(tiny_model_dir, tmp_path, cli_run,
                                                                          monkeypatch):
    """Fault injection: the checkpoint's optimizer state hits ENOSPC, as torch.save raises it."""
    import torch

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=6, save_steps=2)
    path = write_plan(plan, tmp_path / "plan.yaml")
    monkeypatch.setattr(torch, "save", full_disk)
    line = one_line_error(cli_run(path), 1, "the disk is full", f"checkpoint {out / 'checkpoint-4'}", "free in",
                           f"the last complete checkpoint is {out / 'checkpoint-2'}", "--resume")
    assert "B free" in line or "iB free" in line
    assert (out / "checkpoint-2" / "COMPLETE").exists()
    assert not (out / "checkpoint-4" / "COMPLETE").exists()  # the partial save is not marked complete
    monkeypatch.setattr(torch, "save", real_save)
    result = cli_run(path, "--resume")  # space freed: the last complete checkpoint resumes
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6 and summary["status"] == "completed"


@pytest.mark.slow
def test_a_full_disk_while_saving_the_adapter_is_one_line(tiny_model_dir, tmp_path, cli_run, monkeypatch):
    """torch's C++ stream error, as a full disk shows while the final adapter is written."""
    import torch

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "adapter.tmp" in str(f):
            raise RuntimeError("basic_ios::clear: iostream error")
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=4, save_steps=2)
    path = write_plan(plan, tmp_path / "plan.yaml")
    monkeypatch.setattr(torch, "save", full_disk)
    one_line_error(cli_run(path), 1, "the disk is full: saving the adapter failed",
                    f"the last complete checkpoint is {out / 'checkpoint-4'}")
    assert not (out / "adapter").exists() and not (out / "adapter.tmp").exists()
    monkeypatch.setattr(torch, "save", real_save)
    result = cli_run(path, "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_truncated_base_weights_are_named(tiny_model_dir, tmp_path, cli_run, no_model_load):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    plan = build_plan(str(model), data_file("instruction.jsonl"), str(tmp_path / "out"), max_steps=2)
    path = write_plan(plan, tmp_path / "plan.yaml")
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    one_line_error(cli_run(path), 2, f"weights file {weights} is truncated", f"{size // 2:,} of the {size:,} bytes")
    with open(weights, "r+b") as f:
        f.truncate(5)
    one_line_error(cli_run(path), 2, f"weights file {weights} is truncated or corrupt")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_library_chatter_goes_to_run_log_not_the_terminal(tiny_model_dir, tmp_path):
    """bitsandbytes logs 'Failed to load CPU gemm_4bit_forward from kernels-community' at import on CPUs with
    AVX512-BF16 and no `kernels` package, and warns 'Paged optimizers are not supported on CPU' at the first
    step; whatever it says, `run` keeps it in run.log."""
    import torch

    probe = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=subprocess_env(), capture_output=True,
                           text=True)
    said = probe.stderr.strip()
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), method="qlora", max_steps=2,
                      save_steps=2, optimizer="paged-adamw-8bit")
    proc = subprocess.run([sys.executable, "-m", "loraplan.executor.cli", "run", write_plan(plan, tmp_path / "plan.yaml")],
                          env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    if said:  # this machine's bitsandbytes speaks at import: its words are in the log
        assert said.splitlines()[0][:60] in (out / "run.log").read_text()
    if not torch.cuda.is_available():
        assert "Paged optimizers are not supported on CPU" in (out / "run.log").read_text()
