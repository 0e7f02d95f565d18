"""Count the bytes autograd saves for backward, per token, in a forward of a tiny Llama on the CPU.

    python benchmarks/saved_tensors.py            # every combination, as a table (bytes per token per layer)
    python benchmarks/saved_tensors.py --json     # the same, one JSON object per combination

What autograd saves does not depend on the device: it is decided by the modeling code (transformers), peft's LoRA
layer, autocast and torch's checkpoint. So the activation terms of the memory model (planner/memory/terms.py) can be
checked on the CPU, with `torch.autograd.graph.saved_tensors_hooks`:

- every tensor a forward saves passes through the pack hook; views of one tensor share a storage, so tensors are
  counted once per storage (`untyped_storage().data_ptr()`), at the storage's size;
- parameters (the base weights, NF4 weights and LoRA matrices) are saved too; they are counted apart and left out;
- autocast's bf16 copies of the fp32 LoRA weights do not grow with the tokens: two token counts are measured and
  the difference is divided by the difference of tokens, so only what grows with the tokens remains;
- two layer counts separate what each decoder layer saves (the slope: bytes per token per layer) from what the
  model saves once (embeddings, final norm, LM head and loss, per token);
- with gradient checkpointing (torch's non-reentrant checkpoint, as `run` uses) the hook outside the checkpoints
  sees only what is kept across layers; the recompute of one layer in the backward is counted by wrapping the pack
  hook of torch's `_recomputation_hook` (the largest recompute frame is one layer's working set).

The model runs as on the GPU: weights in bf16 (QLoRA: bitsandbytes Linear4bit, NF4, compute dtype bf16, which runs
on the CPU), LoRA matrices in fp32 (peft's default), the step under `torch.autocast(dtype=bfloat16)`,
`attn_implementation="sdpa"`. `offload_checkpoints` is transformers' `gradient_checkpointing_enable(offload=True)`
idea: torch's `save_on_cpu` around the checkpoints; on a CPU the "host" copies are the tensors themselves, so what
is counted is what passes through save_on_cpu's hook (what moves) and what does not (what stays on the GPU).
`offload_activations` (trl, a CUDA stream) and the tiled MLP (Liger's kernels) do not run on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qv": ("q_proj", "v_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
SAVERS = ("none", "layer_checkpointing", "offload_checkpoints")  # the checkpointing savers that run on a CPU
EVERY_N = {"layer_checkpointing": 2}  # layer_checkpointing: every 2nd layer (transformers: index % n == 0)


@dataclass(frozen=True)
class Case:
    targets: str = "all"  # a key of TARGETS
    dropout: float = 0.05
    checkpointing: bool = False
    method: str = "lora"  # lora | qlora
    saver: str = "none"  # none | layer_checkpointing (every 2nd layer) | offload_checkpoints
    adapter_dtype: str = "float32"  # float32 (peft's default) | bfloat16 (trl's cast of a 4-bit model's adapters)


@dataclass(frozen=True)
class Dims:
    hidden: int = 64
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512

    @property
    def kv(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)


@dataclass
class Count:
    """Bytes that grow with the tokens, per token. layer: per decoder layer (the slope over layer counts);
    model: once per model (embeddings, final norm, LM head, loss); kept: with checkpointing, kept across layers
    per layer; moved: of `kept`, what an offload hook takes to the host; recompute: the largest recompute frame in
    the backward (one layer's working set); params: parameter bytes saved (not per token, left out above)."""

    layer: float
    model: float
    kept: float = 0.0
    moved: float = 0.0
    recompute: float = 0.0
    params: float = 0.0


def _config(d: Dims, layers: int):
    from loraplan.executor.tiny import tiny_config

    c = tiny_config("llama", vocab_size=d.vocab, hidden_size=d.hidden, num_layers=layers)
    c.intermediate_size = d.intermediate
    c.num_attention_heads = d.heads
    c.num_key_value_heads = d.kv_heads
    c.head_dim = d.hidden // d.heads
    c.use_cache = False
    return c


def _model(d: Dims, layers: int, case: Case):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(d, layers), dtype=torch.bfloat16, attn_implementation="sdpa")
    if case.method == "qlora":
        import bitsandbytes as bnb

        def swap(parent):
            for name, child in parent.named_children():
                if isinstance(child, torch.nn.Linear) and name != "lm_head":
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, blocksize=64)
                    q.weight = q.weight._quantize("cpu") if hasattr(q.weight, "_quantize") else q.weight
                    setattr(parent, name, q)
                else:
                    swap(child)

        swap(model)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=case.dropout, bias="none",
                                             target_modules=list(TARGETS[case.targets]), task_type="CAUSAL_LM"))
    if case.adapter_dtype == "bfloat16":  # trl >= 0.26 SFTTrainer on a model loaded in 4 bits: param.data.to(bf16)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    cuda_dropout = _cuda_dropout_class()
    for m in list(model.modules()):  # peft's dropouts: the CUDA path (see _cuda_dropout_class)
        for name, child in m.named_children():
            if type(child) is torch.nn.Dropout:
                setattr(m, name, cuda_dropout(child.p))
    model.train()
    return model


R = 8  # LoRA rank of the counted models


def _cuda_dropout_class():
    import torch

    class _CudaDropout(torch.nn.Module):
        """nn.Dropout as it runs on a GPU. torch's `dropout` takes the fused `native_dropout` kernel only on CUDA
        (ATen/native/Dropout.cpp `is_fused_kernel_acceptable`: input.is_cuda()), which saves a bool mask, 1 B per
        element; on a CPU it falls back to input * noise and saves the noise in the input's dtype (fp32 here,
        4 B). `native_dropout` runs on a CPU too: calling it directly counts what the GPU saves."""

        def __init__(self, p: float):
            super().__init__()
            self.p = p

        def forward(self, x):
            return torch.native_dropout(x, self.p, self.training)[0] if self.training else x

    return _CudaDropout


class _Saved:
    """Storages saved through a pack hook: bytes per storage, parameters apart."""

    def __init__(self, param_ptrs: set[int], keep: bool = False):
        self.param_ptrs = param_ptrs
        self.sizes: dict[int, int] = {}
        self.params: dict[int, int] = {}
        self.kept: list = [] if keep else None  # hold the storages, so that no freed address is counted twice

    def add(self, t) -> None:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        (self.params if ptr in self.param_ptrs else self.sizes)[ptr] = s.nbytes()
        if self.kept is not None:
            self.kept.append(s)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


@contextlib.contextmanager
def _recompute_frames(frames: list):
    """Count what each recompute of torch's non-reentrant checkpoint saves (one `_Saved` per recomputed region)."""
    import torch.utils.checkpoint as C

    original = C._recomputation_hook.__init__

    def init(self, target_frame_ref, gid):
        original(self, target_frame_ref, gid)
        saved = _Saved(set(), keep=True)
        frames.append(saved)
        pack = self.pack_hook

        def counting(x):
            saved.add(x)
            return pack(x)

        self.pack_hook = counting

    C._recomputation_hook.__init__ = init
    try:
        yield
    finally:
        C._recomputation_hook.__init__ = original


def _measure(d: Dims, layers: int, tokens: tuple[tuple[int, int], ...], case: Case) -> list[dict]:
    """Bytes saved in one forward (and the largest recompute frame in its backward) at each batch x seq of
    `tokens`, on one model."""
    import torch
    from torch.autograd.graph import saved_tensors_hooks

    model = _model(d, layers, case)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for m in model.modules():  # bitsandbytes' quant_state tensors ride on the weight, not as parameters
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            for v in vars(qs).values():
                if torch.is_tensor(v):
                    params.add(v.untyped_storage().data_ptr())
    return [_step(model, d, params, t, case) for t in tokens]


def _step(model, d: Dims, params: set[int], tokens: tuple[int, int], case: Case) -> dict:
    import torch
    from torch.autograd.graph import saved_tensors_hooks

    batch, seq = tokens
    ids = torch.randint(3, d.vocab, (batch, seq))
    outer = _Saved(params)
    moved = _Saved(params)
    frames: list[_Saved] = []

    def pack(t):
        outer.add(t)
        return t

    if case.checkpointing:
        # transformers' own checkpoint function (modeling_utils `_activation_checkpointing_enable`): torch's
        # non-reentrant checkpoint; with offload, wrapped in save_on_cpu(pin_memory=True), which on a CPU cannot pin.
        # The same wrapper with a counting hook in save_on_cpu's place counts what the offload moves.
        import functools

        from torch.utils.checkpoint import checkpoint

        def offloaded(function, *args, **kwargs):
            def p(t):
                moved.add(t)
                outer.add(t)
                return t

            with saved_tensors_hooks(p, lambda t: t):
                return checkpoint(function, *args, **kwargs)

        func = offloaded if case.saver == "offload_checkpoints" else checkpoint
        base = model.get_base_model()
        base._set_gradient_checkpointing(enable=True, every_n_layers=EVERY_N.get(case.saver, 1),
                                         gradient_checkpointing_func=functools.partial(func, use_reentrant=False))
    with _recompute_frames(frames):
        with saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        saved, kept_moved, param_bytes = outer.total, moved.total, sum(outer.params.values())
        loss.backward()
    recompute = max((f.total for f in frames), default=0)
    return dict(saved=saved, moved=kept_moved, recompute=recompute, params=param_bytes)


def count(d: Dims, case: Case, layers: tuple[int, int] = (2, 4), tokens: tuple[tuple[int, int], tuple[int, int]]
          = ((2, 32), (2, 64))) -> Count:
    """What grows with the tokens, per token: per decoder layer and once per model (see `Count`).

    With checkpointing `layer` is what a layer keeps across the forward (its checkpointed input; with
    layer_checkpointing the mean over checkpointed and plain layers), `kept` the same, `recompute` the largest
    recompute frame per token, and `model` what is kept once."""
    (l1, l2), (t1, t2) = layers, tokens
    n1, n2 = t1[0] * t1[1], t2[0] * t2[1]
    m = {}
    for la in layers:
        a, b = _measure(d, la, (t1, t2), case)
        m[(la, t1)], m[(la, t2)] = a, b

    def per_token(la: int, key: str) -> float:
        return (m[(la, t2)][key] - m[(la, t1)][key]) / (n2 - n1)

    layer = (per_token(l2, "saved") - per_token(l1, "saved")) / (l2 - l1)
    model = per_token(l1, "saved") - l1 * layer
    moved = (per_token(l2, "moved") - per_token(l1, "moved")) / (l2 - l1)
    recompute = per_token(l1, "recompute")
    return Count(layer=layer, model=model, kept=layer if case.checkpointing else 0.0, moved=moved,
                 recompute=recompute, params=float(m[(l1, t1)]["params"]))


def cases() -> list[Case]:
    """Every combination that runs on a CPU: targets x dropout x checkpointing x method x saver, and QLoRA's
    bf16-cast adapters (trl) for each target set and dropout."""
    out = []
    for tg, dp, gc, me, sv in itertools.product(TARGETS, (0.0, 0.05), (False, True), ("lora", "qlora"), SAVERS):
        if sv != "none" and not gc:
            continue  # offload_checkpoints moves the checkpoints: it needs checkpointing
        out.append(Case(tg, dp, gc, me, sv))
    for tg, dp in itertools.product(TARGETS, (0.0, 0.05)):  # QLoRA's adapters as trl casts them, without checkpointing
        out.append(Case(tg, dp, False, "qlora", "none", "bfloat16"))
    return out


DIMS = (Dims(64, 128, 4, 2), Dims(128, 352, 4, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per combination and width")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from loraplan.executor.train import quiet_libraries

    quiet_libraries()
    if not args.json:
        print(f"{'targets':7} {'drop':>5} {'ckpt':>4} {'method':6} {'saver':19} {'h':>4} {'kv':>3} {'i':>4} "
              f"{'B/tok/layer':>11} {'per h':>6} {'model B/tok':>11} {'moved':>6} {'recompute':>9}")
    for d in DIMS:
        for case in cases():
            c = count(d, case)
            if args.json:
                print(json.dumps(dict(asdict(case), **asdict(d), **asdict(c))))
            else:
                print(f"{case.targets:7} {case.dropout:5.2f} {'on' if case.checkpointing else 'off':>4} "
                      f"{case.method:6} {case.saver:19} {d.hidden:4} {d.kv:3} {d.intermediate:4} {c.layer:11.1f} "
                      f"{c.layer / d.hidden:6.2f} {c.model:11.1f} {c.moved:6.1f} {c.recompute:9.1f}")


if __name__ == "__main__":
    main()
