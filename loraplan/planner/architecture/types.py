"""The shapes LoRA and the memory model need: `Projection` (one kind of adaptable weight) and `Architecture`
(a decoder's dimensions and projections). Plain data; planner.architecture.families builds them from configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Projection:
    """One kind of weight LoRA can adapt, repeated `count` times in the model.

    `peft_name` is what goes into LoraConfig (target_modules, or target_parameters when `param=True`).
    `kinds` are the user-facing short names it covers (q, k, v, o, gate, up, down).
    """

    peft_name: str
    in_features: int
    out_features: int
    count: int  # layers x copies
    bias: bool
    kinds: tuple[str, ...]
    experts: int = 1  # >1 for a fused 3-D expert parameter: LoRA A is [E*r, in], B is [out, E*r]
    param: bool = False  # a fused parameter (peft target_parameters), not an nn.Linear
    quantizable: bool = True  # replaced by bnb Linear4bit under QLoRA (nn.Linear only)

    @property
    def weight_params(self) -> int:
        return self.count * self.experts * self.in_features * self.out_features

    @property
    def bias_params(self) -> int:
        return self.count * self.experts * self.out_features if self.bias else 0

    def lora_params(self, r: int) -> int:
        """peft LoRA: A is r x in, B is out x r (per expert for fused experts): r * (in + out)."""
        return self.count * self.experts * r * (self.in_features + self.out_features)


@dataclass
class Architecture:
    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    projections: list[Projection]
    # parameters outside the projections, in the compute dtype and never quantized
    embedding_params: int
    lm_head_params: int  # 0 when tied to the embeddings
    norm_params: int
    other_params: int  # routers, q/k norms, ...
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    activation: str = "silu"
    norms_per_layer: int = 2
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def attn_implementation(self) -> str:
        """What `run` asks transformers for: sdpa, except where the model cannot use it (Gemma 2's attention
        logit softcapping: transformers marks it `_supports_sdpa = False`), which gets eager attention."""
        if self.family == "gemma2" or self.config.get("attn_logit_softcapping"):
            return "eager"
        return "sdpa"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def projection_params(self) -> int:
        return sum(p.weight_params + p.bias_params for p in self.projections)

    def largest_projection_params(self, quantizable_only: bool = False) -> int:
        """Parameters of the largest single projection weight (one fused expert tensor for a MoE); with
        quantizable_only, of the largest one bitsandbytes quantizes (nn.Linear only)."""
        return max((p.weight_params // max(p.count, 1) for p in self.projections
                    if p.quantizable or not quantizable_only), default=0)

    @property
    def total_params(self) -> int:
        return (
            self.projection_params
            + self.embedding_params
            + self.lm_head_params
            + self.norm_params
            + self.other_params
        )

    def kinds(self) -> list[str]:
        out: list[str] = []
        for p in self.projections:
            for k in p.kinds:
                if k not in out:
                    out.append(k)
        return out
