"""PlanTrainer: trl's SFTTrainer with the plan's loss, checkpoints marked complete, and rotation after the mark.
Imported only when a run starts (it imports trl); the trl-based backends build it (executor/backends/hf.py)."""

from __future__ import annotations

import os

from transformers import Trainer
from trl import SFTTrainer

from . import checkpoints


class PlanTrainer(SFTTrainer):
    """SFTTrainer with the plan's loss, checkpoints marked complete, and rotation after the mark.

    loss "fused": trl's own compute_loss, which projects through the LM head in tiles and never builds the
    full (batch, seq, vocab) logits. loss "full": Trainer's compute_loss, the model's forward with labels,
    which materializes the logits (and the model's loss upcasts them to fp32), as the plan budgeted.
    """

    def __init__(self, *args, plan_loss: str, keep_checkpoints: int, sharded: bool = False, **kwargs):
        self.plan_loss = plan_loss
        self.keep_checkpoints = keep_checkpoints
        self.sharded = sharded
        super().__init__(*args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        """trl writes a README.md model card into output_dir before every checkpoint: the run's folder may
        hold the user's own README.md, and a run writes only its own files (peft's adapter/README.md stays)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        # Sharded plans on a machine without a GPU: accelerate would fall back to multi-CPU DDP (executor/fsdp.py)
        if self.sharded:
            from .fsdp import enable_fsdp_on_cpu

            if enable_fsdp_on_cpu(self.accelerator):
                self.is_fsdp_enabled = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from .compat import use_fused_loss

        if self.plan_loss == "full" or not use_fused_loss(self.plan_loss, self.args.device.type):
            # (trl 1.15's fused loss is Triton only: on a CPU the loss comes from the full logits; planner/facts/versions.py)
            inputs = {**inputs, "use_cache": False}
            return Trainer.compute_loss(
                self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        # A step saved again (after resuming past a damaged checkpoint) is incomplete until re-marked.
        stale = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}", checkpoints.COMPLETE_MARKER)
        if self.args.should_save and os.path.exists(stale):
            os.unlink(stale)
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank has written its part (RNG state is per rank)
        if self.args.should_save:
            step = self.state.global_step
            folder = os.path.join(self.args.output_dir, f"checkpoint-{step}")
            checkpoints.mark_complete(folder, step)
            checkpoints.rotate_checkpoints(self.args.output_dir, self.keep_checkpoints)
