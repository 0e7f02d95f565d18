"""The Unsloth backend's memory terms (planner/memory/unsloth.py) checked by hand on one synthetic Llama, and the
planned peaks against Unsloth's published context table (benchmarks/unsloth_table.py)."""

from __future__ import annotations

import pytest
import yaml

from loraplan.planner.memory import terms as memory
from loraplan.planner.memory import unsloth as U
from loraplan.planner.architecture.families import from_config
from loraplan.planner.architecture.targets import select_targets
from loraplan.tables import TABLES_DIR

h, i, L, heads, kv_heads, V = 1024, 4096, 8, 16, 4, 32000
kv = kv_heads * (h // heads)  # 256
CONFIG = {"model_type": "llama", "hidden_size": h, "intermediate_size": i, "num_hidden_layers": L,
          "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": V, "tie_word_embeddings": False}
FIT = yaml.safe_load((TABLES_DIR / "memory.yaml").read_text())["fitted"]
ARCH = from_config(CONFIG)
SEL = select_targets(ARCH, None)
MIB, GIB = 2**20, 2**30
mb, seq = 2, 1024
T = mb * seq  # 2048 tokens: one layer input is 2 x 1024 x 2048 = 4 MiB, above Unsloth's 2 MiB offload floor


def shape(**kw):
    base = dict(method="qlora", rank=16, micro_batch_size=mb, seq_len=seq, grad_checkpointing=True, loss="fused")
    base.update(kw)
    return memory.MicroStep(**base)


def test_offloaded_checkpoints_keep_the_last_layer_by_hand():
    s = shape()
    assert U.layer_input_bytes(ARCH, s) == 2 * h * T == 4 * MIB
    assert U.offloaded_layers(ARCH, s) == L - 1
    assert U.offloaded_checkpoints_bytes(ARCH, s) == 2 * h * T  # the last layer's input alone
    # at or under 2 MiB nothing is offloaded: every input stays on the GPU
    small = shape(seq_len=512)  # 2 x 1024 x 1024 = 2 MiB exactly
    assert U.offloaded_layers(ARCH, small) == 0
    assert U.offloaded_checkpoints_bytes(ARCH, small) == L * 2 * h * 1024
    assert U.offloaded_checkpoints_bytes(ARCH, shape(grad_checkpointing=False)) == 0


def test_copy_back_buffers_by_hand():
    s = shape()
    assert U.copy_back_bytes(ARCH, s) == 2 * 2 * h * T  # double buffering (free memory unknown)
    assert U.copy_back_bytes(ARCH, s, free_after_first_step=600 * MIB) == 2 * 2 * h * T
    assert U.copy_back_bytes(ARCH, s, free_after_first_step=512 * MIB) == 2 * h * T  # not over the 512 MiB headroom
    assert U.copy_back_bytes(ARCH, shape(seq_len=512)) == 0  # nothing offloaded, nothing copied back


def test_chunked_loss_by_hand():
    s = shape()
    fixed = 2 * h * T
    logits = 16 * T * V  # 1.05 GB of fp32 transients for the whole batch
    # 4 GiB cap: one chunk fits
    assert U.loss_target_bytes(None) == 4 * GIB
    assert U.loss_chunks(ARCH, s, 4 * GIB) == 1
    assert U.chunked_loss_bytes(ARCH, s) == fixed + logits
    # 1 GiB free at the first call: target 0.5 GiB, less the fixed 4 MiB; 16 T V / target = 1.97 -> 4 chunks
    target = U.loss_target_bytes(1 * GIB)
    assert target == 0.5 * GIB
    assert logits / (target - fixed) == pytest.approx(1.9685, abs=1e-3)
    assert U.loss_chunks(ARCH, s, target) == 4
    assert U.chunked_loss_bytes(ARCH, s, 1 * GIB) == fixed + logits / 4
    # a huge card is still capped at 4 GiB
    assert U.loss_target_bytes(100 * GIB) == 4 * GIB


def test_fused_activations_with_and_without_dropout_by_hand():
    assert U.fused_layer_bytes_per_token(ARCH, dropout=False) == 12 * h + 4 * kv + 4 * i
    assert U.fused_layer_bytes_per_token(ARCH, dropout=True) == 18 * h + 4 * kv + 5 * i
    s = shape()
    scale = FIT["fused_activation_scale"] + FIT["recompute_scale"]
    assert U.activations_bytes(ARCH, s, True, False) == pytest.approx(scale * (12 * h + 4 * kv + 4 * i) * T)
    off = shape(grad_checkpointing=False)  # every layer's saved tensors: the one scale of a forward, trl's or not
    assert U.activations_bytes(ARCH, off, True, True) == pytest.approx(
        FIT["activation_scale"] * (18 * h + 4 * kv + 5 * i) * L * T)
    # the difference dropout makes, per token and layer: 6 h + i bytes of masks
    assert U.fused_layer_bytes_per_token(ARCH, True) - U.fused_layer_bytes_per_token(ARCH, False) == 6 * h + i


def test_fused_kernels_refused_with_bias():
    assert U.fused_kernels_apply(ARCH, "none") is None
    assert "bias" in U.fused_kernels_apply(ARCH, "all")
    qwen = from_config({**CONFIG, "model_type": "qwen2"})  # q, k, v biases
    assert U.fused_kernels_apply(qwen) is not None


def test_dequantize_buffer_by_hand():
    assert U.dequantize_buffer_bytes(ARCH, shape()) == 2 * h * i  # the largest NF4 weight: gate / up / down
    assert U.dequantize_buffer_bytes(ARCH, shape(method="lora")) == 0


def test_pinned_host_memory_by_hand():
    pool = 200 * 2 * 128 * 1024
    assert pool == 50 * MIB
    assert U.pinned_host_bytes(ARCH, shape()) == pool + L * 4 * MIB  # 4 MiB is a power of two already
    odd = shape(micro_batch_size=1, seq_len=3000)  # 2 x 1024 x 3000 = 6,144,000 B -> an 8 MiB block
    assert U.pinned_host_bytes(ARCH, odd) == pool + L * 8 * MIB
    assert U.pinned_host_bytes(ARCH, shape(seq_len=512)) == pool  # nothing offloaded: the pool alone
    [term] = U.unsloth_host_terms(ARCH, shape(), processes=2)
    assert term.device == "host" and term.bytes == 2 * (pool + L * 4 * MIB)


def test_unsloth_budget_replaces_the_standard_terms():
    s = shape()
    base = memory.budget(ARCH, SEL, s)
    terms = U.unsloth_budget(ARCH, s, base, dropout=0.0)
    names = [t.name for t in terms]
    for gone in ("checkpointed_inputs", "fused_loss"):
        assert gone not in names
    for name in ("offloaded_checkpoints", "copy_back_buffers", "activations", "dequantize_buffer", "chunked_loss",
                 "allocator_reserve", "cuda_context"):
        assert name in names
    kept = {t.name: t.bytes for t in base}
    got = {t.name: t.bytes for t in terms}
    for same in ("nf4_weights", "quant_constants", "unquantized_modules", "lora_weights", "lora_gradients",
                 "optimizer_states", "misc", "cuda_context"):
        assert got[same] == kept[same]
    rho_l, rho_a = FIT["reserve_share_of_loss"], FIT["reserve_share_of_activations"]
    loss, act = U.chunked_loss_bytes(ARCH, s), U.activations_bytes(ARCH, s, True, False)
    assert got["chunked_loss"] == pytest.approx((1 - rho_l) * loss)
    assert got["activations"] == pytest.approx((1 - rho_a) * act)
    assert got["allocator_reserve"] == pytest.approx(rho_l * loss + rho_a * act)
    dropped = {t.name: t.bytes for t in U.unsloth_budget(ARCH, s, base, dropout=0.05)}
    assert dropped["activations"] - got["activations"] == pytest.approx((1 - rho_a) * (
        FIT["fused_activation_scale"] + FIT["recompute_scale"]) * (6 * h + i) * T)


# Unsloth's published table (benchmarks/unsloth_table.py): extrapolated linearly from a few measured lengths, so
# agreement checks a line, not seven measurements. The terms above, from the source alone, plan less than the card
# at every published length, by 2 % at 8 GB growing to 33 % at 80 GB: they miss about 80 KB per token (the
# published slope is ~227 KB per token, the planned ~145 KB). The evidence supports no tighter bound than this
# until a GPU measures Unsloth; the "within a few percent" is the xfail below.
def _errors():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "unsloth_table.py"
    spec = importlib.util.spec_from_file_location("unsloth_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {r["card_gib"]: r["error"] for r in mod.rows()}


def test_planned_peaks_against_the_published_table():
    errors = _errors()
    assert set(errors) == {8, 12, 16, 24, 40, 48, 80}
    for card, err in errors.items():
        assert -0.35 < err < 0.05, (card, err)  # never above the card; at most 35 % under it
    assert abs(errors[8]) < 0.05  # where the weights dominate, the fixed terms agree


@pytest.mark.xfail(strict=True, reason="the source-derived terms miss ~80 KB/token against the published slope")
def test_planned_peaks_within_a_few_percent_of_the_published_table():
    assert all(abs(err) < 0.05 for err in _errors().values())
