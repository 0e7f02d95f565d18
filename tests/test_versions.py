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
