"""The executor: runs a plan exactly as written.

cli (click commands, imports no torch) -> runner (checks, output folder, the launcher table) -> train (the run
sequence over one RunState, through the plan's training backend: backends/, hf first); device (placement, memory
meter), callbacks, trainer_settings (plan -> SFTConfig), plan_trainer; model (the base model's files), data (read,
check, render, tokenize); the run folder: run_files (names), folder_lock, claim, resume, disk, checkpoints;
launch + worker (ddp, fsdp), merge, report, demo + tiny (offline models).
"""
