"""The executor: runs a plan exactly as written.

cli (click commands, imports no torch) -> runner (checks, output folder, in-process or launch) -> train
(SFTTrainer from the plan, callbacks, checkpoints, summary); model (load, quantize, wrap), data (read, check,
render, tokenize), outputs (the run folder), launch + worker (ddp, fsdp), merge, report, demo + tiny (offline models).
"""
