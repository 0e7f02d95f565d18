"""The tokens/s "Strategies tried" ranks and shows is the estimate's, savers included (issue 12, 5b): one function
(planner.decision.estimate.rate) computes both, so the chosen strategy's row and the estimate line cannot differ."""

import pytest

from loraplan.planner.api import PlanRequest, make_plan

CASES = [
    # savers chosen under --seq-len max: the table said 834 tokens/s for fsdp, the estimate 779
    dict(model="llama-3.1-8b", gpu="l40s", num_gpus=2, seq_len="max"),
    dict(model="llama-3.1-8b", gpu="rtx-4090", num_gpus=2, seq_len="max"),
    dict(model="llama-3.1-8b", gpu="rtx-4090", num_gpus=4, seq_len=8192, savers="auto", host_memory="256GiB"),
    dict(model="llama-3.1-8b", gpu="h100-80gb", num_gpus=2, seq_len=2048),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: f"{kw['gpu']}x{kw['num_gpus']}-{kw['seq_len']}")
def test_the_chosen_strategy_shows_the_estimates_tokens_per_s(kw):
    res = make_plan(PlanRequest(fit_table=False, **kw))
    assert res.feasible
    chosen = next(o for o in res.strategies if o.strategy == res.plan.strategy)
    assert chosen.tokens_per_s == pytest.approx(res.estimate.tokens_per_s, rel=1e-12)
    assert res.plan.prediction.tokens_per_s == pytest.approx(chosen.tokens_per_s, rel=1e-12)

