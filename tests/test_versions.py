"""planner.facts.versions: installed versions from package metadata, never by importing; the terms that depend on them."""

import subprocess
import sys

from loraplan.planner.architecture import families
from loraplan.planner.memory import terms as memory
from loraplan.planner.facts import versions as V


def test_parse_and_read_without_importing():
    assert V.parse("2.13.0+cpu") == (2, 13, 0) and V.parse("1.7.0rc1") == (1, 7, 0)
    code = ("import sys; from loraplan.planner.facts import versions as V; v = V.installed(); "
            "assert 'torch' not in sys.modules and 'trl' not in sys.modules, sorted(sys.modules); print(v['trl'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "version" in out.stdout


def test_the_fused_loss_counts_the_fp32_upcast_before_torch_2_8(monkeypatch):
    arch = families.from_config({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                          "vocab_size": 128256, "tie_word_embeddings": False})
    shape = memory.MicroStep(method="qlora", rank=16, micro_batch_size=4, seq_len=2048, grad_checkpointing=True, loss="fused")
    new = memory.fused_loss_bytes(arch, shape)
    assert new == 12 * 4096 * 8192 + 2 * 4096 * 32768  # 12 B x h x T + one bf16 tile of 4096 x 32768
    monkeypatch.setattr(V, "installed", lambda: {**{k: {"version": v, "source": "assumed"}
                                                   for k, v in V.DEFAULTS.items()},
                                                "torch": {"version": "2.7.1", "source": "installed"}})
    assert memory.fused_loss_bytes(arch, shape) - new == 4 * (4096 * 32768 + 32768 * 4096)
    assert "torch < 2.8" in V.assumed()["terms"]["fused_loss"]


def _with_trl(monkeypatch, version: str) -> None:
    monkeypatch.setattr(V, "installed", lambda: {**{k: {"version": v, "source": "assumed"}
                                                   for k, v in V.DEFAULTS.items()},
                                                "trl": {"version": version, "source": "installed"}})


def test_qlora_adapters_follow_trls_bf16_cast(monkeypatch):
    """trl >= 0.26 casts a 4-bit model's trainable parameters to bf16 (sft_trainer.py), as `run` loads QLoRA
    through from_pretrained; the plan's adapter, gradient and AdamW bytes follow, and say which trl they assumed."""
    from loraplan.planner.architecture.targets import select_targets, trainable_params

    arch = families.from_config({"model_type": "llama", "hidden_size": 1024, "intermediate_size": 4096,
                                 "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4,
                                 "vocab_size": 32000, "tie_word_embeddings": False})
    sel = select_targets(arch, None)
    p = trainable_params(sel, 16)

    def adapter_terms(method, dtype="bfloat16", optimizer="adamw"):
        shape = memory.MicroStep(method=method, rank=16, micro_batch_size=1, seq_len=512, grad_checkpointing=False,
                                 loss="fused", dtype=dtype, optimizer=optimizer,
                                 adapter_dtype=V.adapter_dtype(method, dtype))
        t = {x.name: x.bytes for x in memory.budget(arch, sel, shape)}
        return t["lora_weights"], t["lora_gradients"], t["optimizer_states"]

    _with_trl(monkeypatch, "1.16.0")
    assert V.adapter_dtype("qlora", "bfloat16") == "bfloat16"
    assert adapter_terms("qlora") == (2 * p, 2 * p, 4 * p)  # bf16 weights, gradients and two bf16 moments
    assert adapter_terms("qlora", optimizer="adamw-8bit")[2] == 2 * p  # 8-bit moments whatever the dtype
    assert adapter_terms("lora") == (4 * p, 4 * p, 8 * p)  # LoRA: peft's fp32
    assert adapter_terms("qlora", dtype="float16") == (4 * p, 4 * p, 8 * p)  # executor casts back to fp32
    assert "trl >= 0.26" in V.assumed()["terms"]["adapter_dtype"]
    _with_trl(monkeypatch, "0.25.1")
    assert V.adapter_dtype("qlora", "bfloat16") == "float32"
    assert adapter_terms("qlora") == (4 * p, 4 * p, 8 * p)
    assert "trl < 0.26" in V.assumed()["terms"]["adapter_dtype"]
