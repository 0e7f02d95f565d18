"""The end-of-run report and the over-prediction rule (GPU figures given, since no GPU runs here)."""

from __future__ import annotations

import io

from conftest import build_plan, data_file


def _summary(**over):
    s = {
        "status": "completed", "predicted_peak_gib": 10.0, "observed_peak_gib": 12.5,
        "observed_peak_gib_per_gpu": [12.5, 11.0], "margin_gib": 1.6, "over_prediction": True,
        "cpu_rss_peak_gib": 3.0, "tokens_per_s": 1234.0, "predicted_tokens_per_s": 1500.0, "steps": 10,
        "max_steps": 10, "resumed_from_step": None, "first_loss": 2.0, "final_loss": 1.0, "eval_loss": None,
        "truncated_sequences": 3, "dropped_rows": 0, "train_s": 5.0, "wall_s": 9.0, "output_dir": "/o",
        "adapter_dir": "/o/adapter", "last_checkpoint": "/o/checkpoint-10", "plan_file": "/o/plan.yaml",
        "metrics_file": "/o/metrics.jsonl",
    }
    s.update(over)
    from loraplan.executor.summary import RunSummary

    return RunSummary.from_dict(s)  # the report reads the typed record, as run hands it over


def _render(summary) -> str:
    from rich.console import Console

    from loraplan.executor.report import print_report

    buf = io.StringIO()
    print_report(summary, Console(file=buf, width=120))
    return buf.getvalue()


def test_report_shows_each_gpu_and_says_plainly_when_the_prediction_was_exceeded():
    text = _render(_summary())
    assert "GPU 0" in text and "GPU 1" in text and "12.50 GiB" in text and "10.00 GiB" in text
    assert "exceeds the predicted 10.00 GiB by more than the plan's margin" in text
    assert "/o/adapter" in text and "/o/checkpoint-10" in text and "1,234" in text and "3 (dropped rows: 0)" in text
    assert "exceeds" not in _render(_summary(over_prediction=False))


def test_a_summary_round_trips_through_its_type_and_refuses_an_unknown_key(tmp_path):
    import json

    import pytest

    from loraplan.executor.summary import RunSummary

    s = _summary()
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(s.to_dict()))
    assert RunSummary.read(str(path)) == s
    with pytest.raises(ValueError, match="obsreved_peak_gib"):
        RunSummary.from_dict({"status": "completed", "obsreved_peak_gib": 1.0})


def test_over_prediction_rule_uses_the_margin_of_card_memory(tmp_path):
    from loraplan.executor.train import exceeds_prediction

    plan = build_plan("m", data_file("text.jsonl"), str(tmp_path))  # predicted 1.0 GiB, margin 0.1 x 16 GiB
    assert not exceeds_prediction(plan, None)
    assert not exceeds_prediction(plan, 2.5)
    assert exceeds_prediction(plan, 2.7)
