"""QLoRA under FSDP2, loaded one FSDP unit at a time ("layer-streamed"): no rank ever holds more than its shard of
the 4-bit weights plus the one unit in flight, on its GPU or in its host memory.

Why not the libraries' one-call paths (read in the installed sources):
- accelerate 1.15 `fsdp2_prepare_model` skips `cpu_ram_efficient_loading` for a model with bitsandbytes
  `Params4bit` ("bypassing the move to meta will still cause the VRAM spike"), so every rank first holds the whole
  4-bit model;
- torch's `set_model_state_dict(broadcast_from_rank0=True)` (and accelerate's `fsdp2_load_full_state_dict`) broadcast
  the parameters only: a 4-bit weight's quantization constants (absmax, the nested statistics) live in its
  `quant_state`, outside every state dict entry the broadcast fills, so a meta-built rank would end up with packed
  weights it cannot dequantize.

So every rank reads the checkpoint itself, unit by unit, with the libraries' own pieces (Answer.AI's `fsdp_qlora`
`train.py` loads and quantizes layer by layer the same way, with FSDP1 and rank 0 broadcasting):
1. `from_pretrained(..., quantization_config, device_map={"": "meta"})`: transformers builds the quantized model
   (bitsandbytes `Linear4bit` with its `Params4bit` settings, `is_loaded_in_4bit`) without any weight.
2. peft's `get_peft_model` adds the adapter, its own initialisation on the host: while it wraps, each meta weight
   is stood in for by a one-element tensor expanded to the weight's shape and dtype (`wrap_on_host`), since peft puts
   a new adapter on its base layer's device and would otherwise initialise it on meta.
3. For each FSDP unit in accelerate's order (the decoder layers its wrap policy picks, bottom-up; the embeddings;
   the tail [final norm, LM head]; the root), `set_module_tensor_to_device` (accelerate's loader) fills the unit's
   tensors from the checkpoint's safetensors files (read through mmap, one tensor at a time), quantizing each
   `Params4bit` on the rank's device as it lands there, and torch's `fully_shard` with the kwargs accelerate would
   pass (from the Trainer's own FullyShardedDataParallelPlugin) keeps the rank's dim-0 shard and frees the rest.
4. The root is sharded last, so accelerate's `fsdp2_prepare_model` finds an `FSDPModule` and leaves it as it is:
   the units, their settings and the training are the ones accelerate's path gives (tests/test_run_fsdp.py checks
   the units and the trained adapter against the other paths).

The 4-bit weights are packed in the plan's floating storage dtype (`bnb_4bit_quant_storage`), so they shard like
any tensor; the adapter is cast to one dtype with them where FSDP2 needs one (executor/backends/hf.py).
Each rank keeps every layer's quantization constants whole (they are not parameters, so FSDP does not shard them):
about 1/64 of the packed weights in fp32, 1/256 with double quantization.

The planner's side of this path is planner/memory/loading.py ("layer-streamed").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from .errors import RunError

STREAMED = "layer-streamed"
WHOLE = "whole"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."


def checkpoint_files(model_dir: str) -> Optional[dict[str, str]]:
    """Checkpoint key -> the safetensors file holding it, or None when the model directory has no safetensors
    checkpoint (a `.bin` one cannot be read a tensor at a time)."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {key: os.path.join(model_dir, name) for key, name in weight_map.items()}
    single = os.path.join(model_dir, SINGLE_FILE)
    if not os.path.exists(single):
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}


def sharded_qlora(plan) -> bool:
    """The plan is QLoRA under FSDP: the only plans whose load can be layer-streamed."""
    from .fsdp import is_sharded

    return plan.quantization.enabled and is_sharded(plan)


def load_path(plan, model_dir: str) -> str:
    """How this plan's model loads: STREAMED for QLoRA under FSDP when the checkpoint can be read tensor by tensor
    under the model's own names, else WHOLE (each rank loads the whole model; for LoRA accelerate's
    cpu_ram_efficient_loading then keeps one copy on rank 0). The planner plans the same
    (planner/memory/loading.py): a mixture-of-experts checkpoint, whose expert tensors transformers fuses as it
    loads, loads whole."""
    if not sharded_qlora(plan):
        return WHOLE
    return STREAMED if streaming_refusal(plan, model_dir) is None else WHOLE


def streaming_refusal(plan, model_dir: str) -> Optional[str]:
    """Why this model cannot be loaded layer-streamed (one line), or None."""
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=plan.model.trust_remote_code,
                                        local_files_only=True)
    if getattr(config, "quantization_config", None):
        return "the checkpoint is saved quantized"
    if get_checkpoint_conversion_mapping(config.model_type):
        return f"transformers renames or fuses {config.model_type}'s checkpoint tensors as it loads them"
    if not any(os.path.exists(os.path.join(model_dir, name)) for name in (INDEX_FILE, SINGLE_FILE)):
        return "the checkpoint is not safetensors"  # (its tensors are listed once, by shard_while_loading)
    return None


def whole_load_note(plan, model_dir: str) -> Optional[str]:
    """What `run` says before a sharded QLoRA run that cannot stream: every rank loads the whole 4-bit model into
    its host memory first (one line), or None when it streams or the plan is not sharded QLoRA."""
    if not sharded_qlora(plan):
        return None
    why = streaming_refusal(plan, model_dir)
    if why is None:
        return None
    return (f"every rank quantizes the whole 4-bit model in its host memory before sharding it ({why}): host memory "
            f"per node is GPUs per node x the 4-bit model while loading")


def is_on_meta(model) -> bool:
    """The model was built on the meta device (layer-streamed) and its weights are not filled yet."""
    return any(p.is_meta for p in model.parameters())


def checkpoint_key(name: str) -> str:
    """The checkpoint's name of a peft model's base tensor: without peft's wrapper prefix and `.base_layer`."""
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    return name.replace(".base_layer.", ".")


def _meta_tensors(module) -> Iterator[tuple[str, str, object]]:
    """(module-relative name, kind, tensor) of every meta parameter and buffer under `module`, not descending into
    sub-modules that are FSDP units already (their tensors are that unit's)."""
    from torch.distributed.fsdp import FSDPModule

    def walk(mod, prefix):
        for name, p in mod._parameters.items():
            if p is not None and p.is_meta:
                yield prefix + name, "param", p
        for name, b in mod._buffers.items():
            if b is not None and b.is_meta:
                yield prefix + name, "buffer", b
        for child_name, child in mod._modules.items():
            if child is None or isinstance(child, FSDPModule):
                continue
            yield from walk(child, prefix + child_name + ".")

    yield from walk(module, "")


def wrap_on_host(model, wrap: Callable):
    """`wrap(model)` (peft's get_peft_model) on a model whose weights are on the meta device, with the adapter
    created and initialised by peft on the host as it would be on a loaded model: each meta `weight` is stood in for
    by one element expanded to its shape and dtype (no memory), and put back afterwards."""
    import torch

    held = []
    for module in model.modules():
        w = module._parameters.get("weight")
        if w is None or not w.is_meta:
            continue
        stand_in = torch.empty((), dtype=w.dtype).expand(w.shape)
        stood = type(w)(stand_in, requires_grad=w.requires_grad)
        stood.__dict__.update(w.__dict__)  # Params4bit's settings (quant type, storage dtype), which peft reads
        module._parameters["weight"] = stood
        held.append((module, w))
    try:
        wrapped = wrap(model)
    finally:
        for module, w in held:
            w.requires_grad_(module._parameters["weight"].requires_grad)  # peft froze the base
            module._parameters["weight"] = w
    return wrapped


@dataclass
class LoadTrace:
    """Bytes of model tensors this process held during the load, measured after each step (the base model's
    weights, and the adapter's apart): the peak of the first is what the planner's load term predicts
    (planner/memory/loading.py)."""

    steps: list[tuple[str, int, int]] = field(default_factory=list)  # (step, base weights, adapter)
    device_peak_bytes: Optional[int] = None  # on a GPU: the caching allocator's peak allocation by the end of loading

    def record(self, step: str, model) -> None:
        self.steps.append((step, held_bytes(model, trainable=False), held_bytes(model, trainable=True)))

    @property
    def peak_bytes(self) -> int:
        """The most bytes of base-model weights (4-bit weights, their constants, everything not trained) held at once."""
        return max((b for _, b, _ in self.steps), default=0)


def held_bytes(model, trainable: Optional[bool] = None) -> int:
    """Bytes of the model's tensors this process holds now: each parameter's and buffer's local storage (a sharded
    parameter's local shard), not meta ones, plus the 4-bit layers' quantization constants (absmax, the nested
    statistics, the code book: outside the parameters, whole on every rank). Each storage counted once.
    trainable True: the adapter's parameters only; False: everything else; None: all."""
    import torch
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor) or t.is_meta:
            return
        if isinstance(t, DTensor):
            t = t.to_local()
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return
        seen.add(key)
        total += storage.nbytes()

    for p in model.parameters():
        if trainable is None or p.requires_grad == trainable:
            add(p)
    if trainable:
        return total
    for b in model.buffers():
        add(b)
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    return total


class CheckpointReader:
    """One tensor at a time from the checkpoint's safetensors files (memory-mapped: only the bytes of the tensor
    asked for are read)."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self._open: dict[str, object] = {}

    def get(self, key: str):
        from safetensors import safe_open

        path = self.files[key]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path].get_tensor(key)


def fsdp2_kwargs(accelerator) -> dict:
    """The kwargs accelerate 1.15's `fsdp2_prepare_model` passes to every `fully_shard`, from the Trainer's own plugin."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = accelerator.state.fsdp_plugin
    if plugin.ignored_modules is not None:
        raise RunError("layer-streamed loading does not take FSDP ignored_modules; remove them from the accelerate config")
    mesh = getattr(accelerator, "torch_device_mesh", None)
    return {
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }


def units(model, accelerator) -> list[tuple[str, object, dict]]:
    """(label, module or modules, fully_shard kwargs) in the order accelerate 1.15's `fsdp2_prepare_model` shards a
    model: every module its wrap policy picks, bottom-up; the input embeddings (unless tied); the tail [final norm,
    (tied embeddings,) LM head] with reshard_after_forward False; the root without reshard_after_forward."""
    from accelerate.utils.fsdp_utils import (
        _find_final_norm,
        fsdp2_prepare_auto_wrap_policy,
        get_module_children_bottom_up,
    )

    plugin = accelerator.state.fsdp_plugin
    plugin.set_auto_wrap_policy(model)
    kwargs = fsdp2_kwargs(accelerator)
    names = {id(m): n for n, m in model.named_modules()}
    out: list[tuple[str, object, dict]] = []
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    if policy is not None:
        for module in get_module_children_bottom_up(model)[:-1]:
            if policy(module):
                out.append((checkpoint_key(names[id(module)]), module, kwargs))
    input_embed = model.get_input_embeddings()
    output_embed = model.get_output_embeddings()
    tied = (input_embed is not None and output_embed is not None
            and getattr(input_embed, "weight", None) is getattr(output_embed, "weight", None))
    if not tied and input_embed is not None:
        out.append((checkpoint_key(names[id(input_embed)]), input_embed, kwargs))
    final_norm = _find_final_norm(model)
    tail = [m for m in ((final_norm, input_embed, output_embed) if tied else (final_norm, output_embed)) if m is not None]
    if tail:
        out.append(("tail", tail, {**kwargs, "reshard_after_forward": False}))
    out.append(("root", model, {k: v for k, v in kwargs.items() if k != "reshard_after_forward"}))
    return out


def _fill(model, modules, reader: CheckpointReader, shadow_buffers: dict, device, names: dict) -> None:
    """Every meta tensor of `modules` from the checkpoint (non-persistent buffers from the shadow model), on
    `device`: 4-bit weights are quantized there by bitsandbytes as accelerate's loader sets them."""
    from accelerate.utils import set_module_tensor_to_device

    missing: list[tuple[str, str]] = []
    for module in modules:
        prefix = names[id(module)]
        for rel, kind, _ in list(_meta_tensors(module)):
            name = f"{prefix}.{rel}" if prefix else rel
            key = checkpoint_key(name)
            if kind == "buffer" and key in shadow_buffers:
                value = shadow_buffers[key]
            elif key in reader.files:
                value = reader.get(key)
            else:
                missing.append((name, key))  # a tied weight (the LM head sharing the embeddings): tied below
                continue
            set_module_tensor_to_device(model, name, device, value=value)
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            weight = owner._parameters.get("weight") if name.endswith(".weight") else None
            if weight is not None and type(weight).__name__ == "Params4bit":
                weight.module = owner  # what transformers' loader sets: bitsandbytes finds the constants again
                owner.quant_state = weight.quant_state  # after fully_shard swaps the parameter (fsdp all-gathers)
    if missing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.tie_weights()  # transformers' own tying: the LM head takes the embeddings' filled weight
        still = [key for name, key in missing if model.get_parameter(name).is_meta]
        if still:
            raise RunError(f"the checkpoint has no tensor {still[0]}, which the model needs; layer-streamed loading "
                           f"reads the checkpoint's own names")


def shadow_buffers(model, trust_remote_code: bool = False) -> dict:
    """The non-persistent buffers (e.g. rotary inv_freq), which no checkpoint holds: computed by the model class
    itself on the host, built with accelerate's init_empty_weights(include_buffers=False) (parameters on meta)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with init_empty_weights(include_buffers=False):
        shadow = AutoModelForCausalLM.from_config(base.config, trust_remote_code=trust_remote_code)
    persistent = set(shadow.state_dict())
    return {n: b for n, b in shadow.named_buffers() if n not in persistent}


def shard_while_loading(model, model_dir: str, accelerator, trace: Optional[LoadTrace] = None,
                        trust_remote_code: bool = False) -> None:
    """Fill the meta-built peft model from `model_dir` one FSDP unit at a time, sharding each with fully_shard as
    soon as it is whole (see the module docstring). Every rank calls it (fully_shard is collective-free, but the
    units must match)."""
    files = checkpoint_files(model_dir)
    if files is None:
        raise RunError(f"{model_dir} has no safetensors checkpoint; layer-streamed loading reads one tensor at a time "
                       f"from model.safetensors (re-save the model with save_pretrained)")
    from torch.distributed.fsdp import fully_shard

    import torch

    reader = CheckpointReader(files)
    buffers = shadow_buffers(model, trust_remote_code)
    device = accelerator.device
    if device.type == "cpu":  # accelerate says cpu:0; a Parameter moved "to" it is copied into a plain tensor
        device = torch.device("cpu")
    names = {id(m): n for n, m in model.named_modules()}
    trace = trace if trace is not None else LoadTrace()
    trace.record("built on meta (the adapter on the host)", model)
    for label, target, kwargs in units(model, accelerator):
        modules = target if isinstance(target, list) else [target]
        _fill(model, modules, reader, buffers, device, names)
        trace.record(f"{label} whole", model)
        fully_shard(target, **kwargs)
        trace.record(f"{label} sharded", model)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if device.type == "cuda":
        trace.device_peak_bytes = torch.cuda.max_memory_allocated(device)
