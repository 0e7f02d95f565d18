"""What `make_plan` returns: the plan and every fact behind it, and its JSON form (docs/plan-json.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..architecture.model_source import ResolvedModel
from ..architecture.targets import TargetSelection
from ..architecture.types import Architecture
from ..decision.estimate import Estimate
from ..decision.fit_table import FitRow
from ..decision.saver_effects import saver_effects
from ..facts import versions
from ..facts.dataset_stats import DatasetStats
from ..memory import terms as memory
from ..planfile.schema import Plan



@dataclass
class PlanResult:
    plan: Plan
    model: ResolvedModel
    selection: TargetSelection
    trainable_params: int
    terms: list[memory.Term]
    feasible: bool
    usable_gib: float
    hardware_note: str
    suggestions: list[str]
    fit_table: list[FitRow]
    dataset: Optional[DatasetStats]
    estimate: Estimate
    warnings: list[str] = field(default_factory=list)
    strategies: list = field(default_factory=list)  # planner.decision.placement.StrategyOption per strategy tried
    load: Optional[object] = None  # planner.memory.loading.LoadPeak of the plan
    host_terms: list[memory.Term] = field(default_factory=list)  # pinned host memory the savers take
    resolved: Optional[Any] = None  # planner.decision.resolve.Resolved, for the savers' effects
    choice: Optional[Any] = None  # planner.decision.rules.Choice
    from_config: Optional[dict] = None  # plan --from: the tool config's keys, read and not (planner.formats)
    backends: list = field(default_factory=list)  # planner.decision.backend_compare.BackendRow per backend

    @property
    def host_gib(self) -> float:
        """Every pinned host term, the savers' and the backend's (planner.decision.rules.Choice.host_gib)."""
        return sum(t.bytes for t in self.host_terms) / memory.GIB

    def saver_effects(self) -> list:
        """What each saver of the plan buys (planner.decision.saver_effects)."""
        if self.resolved is None or self.choice is None:
            return []

        return saver_effects(self.resolved, self.choice)

    def _savers_json(self) -> dict[str, Any]:
        r, sv = self.resolved, self.plan.savers
        return {
            "modes": dict(r.savers) if r is not None else {},
            "chosen": sv.names,
            "every_n_layers": sv.every_n_layers,
            "effects": [e.to_dict() for e in self.saver_effects()],
            "host": {
                "memory_gib": r.host_memory_gib if r is not None else None,
                "note": r.host_note if r is not None else "",
                "usable_gib": r.usable_host_gib if r is not None else None,
                "pinned_gib": self.host_gib,
                "terms": {t.name: t.gib for t in self.host_terms},
                "formulas": {t.name: t.formula for t in self.host_terms},
            },
            "seq_len_max": bool(r is not None and r.seq_len_max),
            "seq_len_limit": r.seq_len_limit if r is not None else None,
        }

    @property
    def arch(self) -> Architecture:
        return self.model.arch

    @property
    def per_gpu_gib(self) -> float:
        return memory.Term.sum_gib(self.terms)

    def _adapter_json(self) -> dict[str, Any]:
        a, lora = self.arch, self.plan.lora
        return {
            "trainable_params": self.trainable_params,
            "trainable_percent": 100.0 * self.trainable_params / a.total_params,
            "r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
            "target_modules": lora.target_modules, "target_parameters": lora.target_parameters,
            "per_module": [
                {
                    "name": p.peft_name, "kinds": list(p.kinds), "in_features": p.in_features,
                    "out_features": p.out_features, "count": p.count, "experts": p.experts,
                    "params_each": p.lora_params(lora.r) // p.count,
                    "trainable_params": p.lora_params(lora.r),
                    "percent_of_layer": 100.0 * p.lora_params(lora.r) / p.weight_params,
                    "percent_of_model": 100.0 * p.lora_params(lora.r) / a.total_params,
                }
                for p in self.selection.projections
            ],
        }

    def to_json(self) -> dict[str, Any]:
        """Every fact the tables show (docs/plan-json.md documents the schema)."""
        a, plan = self.arch, self.plan
        hw, t = plan.hardware, plan.training
        return {
            "schema": "loraplan.plan-result/1",
            "feasible": self.feasible,
            "model": {
                "name": plan.model.name, "display_name": self.model.display_name, "source": plan.model.source,
                "family": a.family, "path": plan.model.path, "hub_id": plan.model.hub_id,
            },
            "architecture": {
                "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size, "num_layers": a.num_layers,
                "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim,
                "vocab_size": a.vocab_size, "tie_word_embeddings": a.tie_word_embeddings,
                "num_experts": a.num_experts, "experts_per_token": a.experts_per_token,
                "total_params": a.total_params,
            },
            "adapter": self._adapter_json(),
            "hardware": {
                "gpu": hw.gpu, "name": hw.gpu_name, "memory_gib": hw.memory_gib, "num_gpus": hw.num_gpus,
                "num_nodes": hw.num_nodes, "world_size": hw.world_size, "bf16": hw.bf16, "note": self.hardware_note,
                "interconnect_gbs": hw.interconnect_gbs, "network_gbs": hw.network_gbs,
                "host_memory_gib": hw.host_memory_gib,
            },
            "memory": {
                "per_gpu_gib": self.per_gpu_gib,
                "usable_gib": self.usable_gib,
                "headroom_gib": hw.memory_gib - self.per_gpu_gib,
                "safety_margin": plan.prediction.margin,
                "terms": {term.name: term.gib for term in self.terms},
                "formulas": {term.name: term.formula for term in self.terms},
            },
            "decision": {
                "method": plan.method, "micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps,
                "global_batch_size": t.global_batch_size, "grad_checkpointing": t.grad_checkpointing,
                "strategy": plan.strategy, "reasons": plan.reasons,
            },
            "training": dict(plan.to_dict()["training"]),
            "assumptions": plan.assumptions,
            "assumed_versions": versions.assumed(),
            "warnings": self.warnings,
            "strategies": [o.to_dict() for o in self.strategies],
            "loading": None if self.load is None else dataclasses.asdict(self.load),
            "host": {"memory_gib": hw.host_memory_gib, "per_process_gib": memory.Term.host_gib(self.terms),
                     "terms": {t.name: t.gib for t in self.terms if t.device == "host"}},
            "estimate": self.estimate.to_dict(),
            "dataset": None if self.dataset is None else self.dataset.to_dict(),
            "fit_table": [row.to_dict() for row in self.fit_table],
            "suggestions": self.suggestions,
            "savers": self._savers_json(),
            "plan": plan.to_dict(),
            "from_config": self.from_config,
            "backends": [row.to_dict() for row in self.backends],
        }
