"""What a whole training step holds on the CPU: trl's SFTTrainer step beside a plain step, and where a step peaks.

    python benchmarks/step_peaks.py            # both measurements, as text

Two questions the calibration rows cannot answer by themselves (docs/accuracy.md, "Issue 15"):

1. Does trl's SFTTrainer step save more or less per layer than a plain forward of the same model and shape? A real
   `SFTTrainer` (trl 1.16, its fused LM head, collator, metrics and `num_tokens` bookkeeping) trains a tiny Llama
   for a step; its `compute_loss` runs under `torch.autograd.graph.saved_tensors_hooks`, which counts every storage
   the forward saves (benchmarks/saved_tensors.py's counting: per storage, parameters left out). The same model
   is then called plainly (`model(input_ids, labels)` under autocast). Two layer counts give the bytes per token and
   layer of each. Tied and untied embeddings, LoRA and QLoRA (bitsandbytes' Linear4bit on the CPU).
2. Where does a checkpointed step peak? The live bytes of a whole plain step (forward, backward, AdamW step) are
   read from torch's profiler (`profile_memory=True`: every allocation and free on the CPU, `_memory_profile()`'s
   timeline), as the vocabulary grows. If the logits' backward and the recompute of the last checkpointed layer
   overlapped, the peak would grow with the vocabulary from the start; it stays flat while the recompute frame is
   the larger and then grows by what the loss holds per logit. Without checkpointing the same holds against the
   saved activations of all layers plus one layer's backward.

Both are device independent in what they compare (the same kernels on both sides, the CUDA dropout path as
saved_tensors.py runs it); the absolute bytes of the CPU's backward kernels are not the GPU's.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import saved_tensors as st  # noqa: E402


def _model(d, layers: int, case, tied: bool):
    original = st._config

    def config(d_, layers_):
        c = original(d_, layers_)
        c.tie_word_embeddings = tied
        return c

    st._config = config
    try:
        return st._model(d, layers, case)
    finally:
        st._config = original


def _params(model) -> set:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def _plain_saved(model, d, batch: int, seq: int) -> int:
    import torch
    from torch.autograd.graph import saved_tensors_hooks

    ids = torch.randint(3, d.vocab, (batch, seq))
    saved = st._Saved(_params(model))
    with saved_tensors_hooks(lambda t: (saved.add(t), t)[1], lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    total = saved.total
    loss.backward()
    return total


def _trl_saved(model, d, batch: int, seq: int, out_dir: str) -> int:
    """Bytes the forward of one real SFTTrainer step saves (its compute_loss under saved-tensor hooks)."""
    import torch
    from datasets import Dataset
    from torch.autograd.graph import saved_tensors_hooks
    from trl import SFTConfig, SFTTrainer

    from loraplan.executor.tiny import build_tokenizer

    rows = [{"input_ids": torch.randint(3, d.vocab, (seq,)).tolist()} for _ in range(batch)]
    args = SFTConfig(output_dir=out_dir, max_steps=1, per_device_train_batch_size=batch, bf16=True, use_cpu=True,
                     optim="adamw_torch", packing=False, max_length=seq, report_to=[], logging_steps=1,
                     save_strategy="no", gradient_checkpointing=False, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=build_tokenizer(vocab_size=d.vocab))
    counted = {}
    compute_loss = trainer.compute_loss

    def counting(m, inputs, *a, **k):
        saved = st._Saved(_params(trainer.model))
        with saved_tensors_hooks(lambda t: (saved.add(t), t)[1], lambda t: t):
            result = compute_loss(m, inputs, *a, **k)
        counted["saved"] = saved.total
        counted["shape"] = tuple(inputs["input_ids"].shape)
        return result

    trainer.compute_loss = counting
    trainer.train()
    assert counted["shape"] == (batch, seq), counted
    return counted["saved"]


def per_layer_saved(tied: bool = False, method: str = "lora", batch: int = 2, seq: int = 64,
                    dims=st.Dims(64, 128, 4, 2), out_dir: str = "/tmp/step_peaks") -> dict:
    """Bytes per token and decoder layer the forward saves, through trl's SFTTrainer and in a plain call."""
    case = st.Case(method=method)
    counts = {"plain": {}, "trl": {}}
    for layers in (2, 4):
        counts["plain"][layers] = _plain_saved(_model(dims, layers, case, tied), dims, batch, seq)
        counts["trl"][layers] = _trl_saved(_model(dims, layers, case, tied), dims, batch, seq, out_dir)
    t = batch * seq
    return {k: (v[4] - v[2]) / 2 / t for k, v in counts.items()}


def _live_peak(prof) -> int:
    from torch.profiler._memory_profiler import Action

    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def step_peak(vocab: int, checkpointing: bool, layers: int = 4, batch: int = 2, seq: int = 128,
              hidden: int = 128, intermediate: int = 512) -> float:
    """The live-bytes peak of a whole plain step (the second, after AdamW created its states), per token, above
    what was allocated before it."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.checkpoint import checkpoint

    d = st.Dims(hidden=hidden, intermediate=intermediate, heads=4, kv_heads=2, vocab=vocab)
    model = st._model(d, layers, st.Case())
    if checkpointing:  # as `run` and the calibration: torch's non-reentrant checkpoint around each layer
        model.get_base_model()._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=functools.partial(checkpoint, use_reentrant=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(3, vocab, (batch, seq))
    peak = 0
    for _ in range(2):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
        peak = _live_peak(prof)
    return peak / (batch * seq)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from loraplan.executor.train import quiet_libraries

    quiet_libraries()
    print("1. bytes per token and layer the forward saves (tiny Llama h=64, i=128, kv=32, r=8, dropout 0.05)")
    for tied in (False, True):
        for method in ("lora", "qlora"):
            c = per_layer_saved(tied=tied, method=method)
            print(f"   tied={tied!s:5} {method:5}: plain {c['plain']:.1f}, trl SFTTrainer {c['trl']:.1f}")
    print("2. live-bytes peak of a whole plain step per token, as the vocabulary grows (h=128, i=512, 4 layers)")
    for gc in (True, False):
        peaks = [(v, step_peak(v, gc)) for v in (64, 512, 1024, 2048, 4096)]
        slope = (peaks[-1][1] - peaks[-2][1]) / (peaks[-1][0] - peaks[-2][0])
        print(f"   checkpointing {'on ' if gc else 'off'}: " + ", ".join(f"V={v}: {p:.0f}" for v, p in peaks)
              + f"; slope at the top {slope:.2f} B per logit")


if __name__ == "__main__":
    main()
