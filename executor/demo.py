"""`loraplan run --demo`: a tiny random-weight Llama trained with LoRA on a shipped dataset, in under a minute on a
CPU, with the same report as a real run. Needs no download, GPU or planner."""

from __future__ import annotations

import os

from planner.plan import (
    Dataset,
    Hardware,
    LoraSettings,
    ModelRef,
    Plan,
    Prediction,
    Quantization,
    Training,
)

from .errors import RunError

DEMO_NAME = "loraplan-demo"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def demo_plan(model_dir: str, data_path: str, output_dir: str, max_steps: int = 60) -> Plan:
    """The demo's plan, written by hand: LoRA r=8 on every linear layer, fp32 on the CPU, a memorizable dataset."""
    return Plan(
        model=ModelRef(name=DEMO_NAME, source="directory", family="llama", path=model_dir),
        hardware=Hardware(gpu="cpu", gpu_name="CPU", memory_gib=0.0, num_gpus=1, bf16=False),
        method="lora",
        quantization=Quantization(enabled=False, compute_dtype="float32"),
        lora=LoraSettings(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS)),
        training=Training(
            seq_len=128, micro_batch_size=6, grad_accum_steps=1, global_batch_size=6, learning_rate=3e-3,
            max_steps=max_steps, warmup_ratio=0.05, lr_scheduler="cosine", logging_steps=5, save_steps=max_steps,
            save_total_limit=1, dtype="float32", loss="fused",
        ),
        prediction=Prediction(per_gpu_gib=0.0, terms={}, margin=0.0),
        strategy="cpu",
        dataset=Dataset(path=data_path, format="instruction"),
        output_dir=output_dir,
        reasons={"demo": "a tiny random-weight model that shows the whole run path on any machine"},
    )


def prepare_demo(output_dir: str, max_steps: int = 60) -> Plan:
    """Build the demo model under OUTPUT_DIR/model (once) and return the demo plan."""
    from .outputs import PLAN_FILE
    from .tiny import build_tiny_model, demo_data_path

    saved = os.path.join(output_dir, PLAN_FILE)
    if os.path.exists(saved):
        with open(saved, encoding="utf-8") as f:
            if f"name: {DEMO_NAME}" not in f.read():
                raise RunError(f"output dir {output_dir} holds another plan's run; choose another --output-dir for the demo")
    model_dir = os.path.join(output_dir, "model")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        build_tiny_model(model_dir, arch="llama", hidden_size=64, num_layers=2, seed=0)
    return demo_plan(os.path.abspath(model_dir), demo_data_path(), output_dir, max_steps=max_steps)
