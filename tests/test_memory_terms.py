"""Each term of the memory model checked by hand on one synthetic Llama: the formula written out here from
docs/memory-model.md and the coefficients in tables/memory.yaml, against what planner.memory.terms computes."""

from __future__ import annotations

import pytest
import yaml

from loraplan.planner.memory import terms as memory
from loraplan.planner.architecture.families import from_config
from loraplan.planner.architecture.targets import select_targets, trainable_params
from loraplan.planner.plugins.strategies import STRATEGIES
from loraplan.tables import TABLES_DIR

h, i, L, heads, kv_heads, V = 1024, 4096, 8, 16, 4, 32000
d = h // heads  # head_dim 64
kv = kv_heads * d  # 256
CONFIG = {"model_type": "llama", "hidden_size": h, "intermediate_size": i, "num_hidden_layers": L,
          "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": V, "tie_word_embeddings": False}
COEF = yaml.safe_load((TABLES_DIR / "memory.yaml").read_text())
FIT, DER = COEF["fitted"], COEF["derived"]
r, mb, seq = 16, 2, 512
T = mb * seq

ARCH = from_config(CONFIG)
SEL = select_targets(ARCH, None)
PROJ = L * (h * h + 2 * h * kv + h * h + 3 * h * i)  # q, k, v, o, gate, up, down
P = L * r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))


def shape(**kw):
    base = dict(method="lora", rank=r, micro_batch_size=mb, seq_len=seq, grad_checkpointing=False, loss="fused")
    base.update(kw)
    return memory.MicroStep(**base)


def terms(s, strategy="single", num_gpus=1):
    from loraplan.planner.facts.hardware import Hardware

    hw = Hardware(gpu="h100-80gb", gpu_name="H100", memory_gib=79.1, num_gpus=num_gpus, bf16=True)
    return {t.name: t.bytes for t in STRATEGIES[strategy].budget(memory.budget(ARCH, SEL, s), ARCH, P, s, hw)}


def test_trainable_params_by_hand():
    assert trainable_params(SEL, r) == P


def test_weights_by_hand():
    t = terms(shape())
    assert t["base_weights"] == 2 * PROJ
    embeddings_head_norms = V * h + V * h + (2 * L + 1) * h
    assert t["unquantized_modules"] == 2 * embeddings_head_norms


def test_qlora_weights_and_constants_by_hand():
    t = terms(shape(method="qlora"))
    assert t["nf4_weights"] == 0.5 * PROJ
    assert t["quant_constants"] == pytest.approx(PROJ * (1 / 64 + 4 / (64 * 256)))
    no_dq = terms(shape(method="qlora", double_quant=False))
    assert no_dq["quant_constants"] == pytest.approx(PROJ * 4 / 64)
    bs128 = terms(shape(method="qlora", blocksize=128))
    assert bs128["quant_constants"] == pytest.approx(PROJ * (1 / 128 + 4 / (128 * 256)))


def test_adapter_terms_by_hand():
    t = terms(shape())
    assert (t["lora_weights"], t["lora_gradients"], t["optimizer_states"]) == (4 * P, 4 * P, 8 * P)
    assert terms(shape(optimizer="adamw-8bit"))["optimizer_states"] == 2 * P
    assert "ddp_buckets" not in t
    assert terms(shape(), "ddp", num_gpus=2)["ddp_buckets"] == 4 * P


def _x():
    # two norms, sdpa's q, k, v, out, the MLP's gate, up, act(gate), and the seven adapted inputs' bf16 copies and
    # dropout masks (q, k, v, o, gate, up: h wide; down: i wide) with lora_A's rank-r outputs
    lora = (DER["lora_copy_bytes_per_input"] + DER["lora_dropout_bytes_per_input"]) * (6 * h + i)
    return (2 * DER["norm_bytes_per_hidden"] * h + DER["attention_bytes_per_hidden"] * h
            + DER["attention_bytes_per_kv"] * kv + DER["mlp_bytes_per_intermediate"] * i
            + lora + 7 * DER["lora_bytes_per_rank"] * r)


def test_activations_by_hand_without_and_with_checkpointing():
    rho = FIT["reserve_share_of_activations"]
    t = terms(shape())
    # one scale for the forward in both recipes: trl's step saves what a plain forward saves (test_step_peaks.py)
    assert t["activations"] == pytest.approx((1 - rho) * FIT["activation_scale"] * _x() * L * T)
    gc = terms(shape(grad_checkpointing=True))
    frame = (FIT["fused_activation_scale"] + FIT["recompute_scale"]) * _x() * T  # trl's recompute frame
    assert gc["activations"] == pytest.approx((1 - rho) * frame)
    assert gc["checkpointed_inputs"] == pytest.approx(2 * L * h * T)  # the bf16 layer inputs, nothing more
    assert gc["allocator_reserve"] - terms(shape())["allocator_reserve"] == pytest.approx(
        FIT["checkpoint_extra_bytes"] * L * h * T
        + FIT["reserve_share_of_activations"] * (frame - FIT["activation_scale"] * _x() * L * T))
    full = terms(shape(loss="full"))
    assert full["activations"] == pytest.approx((1 - rho) * FIT["activation_scale"] * _x() * L * T)


def test_loss_terms_by_hand():
    rho = FIT["reserve_share_of_loss"]
    fused = terms(shape())["fused_loss"]
    assert fused == pytest.approx(
        (1 - rho) * (DER["fused_loss_bytes_per_token_hidden"] * T * h + 2 * min(T, 4096) * min(V, 32768)))
    full = terms(shape(loss="full"))["logits"]
    assert full == pytest.approx((1 - rho) * FIT["full_loss_bytes_per_logit"] * T * V)


def test_runtime_terms_by_hand():
    t = terms(shape(loss="full"))
    loss = FIT["full_loss_bytes_per_logit"] * T * V
    act = FIT["activation_scale"] * _x() * L * T
    assert t["misc"] == FIT["misc_bytes"]
    assert t["allocator_reserve"] == pytest.approx(
        FIT["reserve_share_of_loss"] * loss + FIT["reserve_share_of_activations"] * act)
    assert t["cuda_context"] == pytest.approx(COEF["measured"]["cuda_context_gib"] * 2**30)
    cpu = terms(shape(device="cpu"))
    assert "cuda_context" not in cpu and "allocator_reserve" not in cpu


def test_the_peak_is_the_sum_of_the_terms():
    s = shape(grad_checkpointing=True)
    assert memory.peak_bytes(ARCH, SEL, s) == pytest.approx(sum(terms(s).values()))
