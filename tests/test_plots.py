"""Pictures: `plan --plot` (PNG and SVG) and run's loss.png, read back with matplotlib."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import one_line_error

matplotlib = pytest.importorskip("matplotlib")


def _plan(*args):
    from loraplan.cli import main

    return CliRunner().invoke(main, ["plan", "llama-3.1-8b", "--gpu", "rtx-4090", *args])


def test_plan_plot_png_and_svg(tmp_path):
    import matplotlib.image as mpimg

    png, svg = tmp_path / "m.png", tmp_path / "m.svg"
    assert _plan("--method", "qlora", "--plot", str(png)).exit_code == 0
    image = mpimg.imread(str(png))
    height, width = image.shape[:2]
    assert 1000 < width < 2200 and 500 < height < 1000, (width, height)  # 9 x 5.2 in at 120 dpi, legend beside
    assert image[..., :3].std() > 0.1  # drawn, not blank
    assert _plan("--plot", str(svg), "--no-fit-table").exit_code == 0
    text = svg.read_text(encoding="utf-8")
    for label in ("peak memory per GPU (GiB)", "sequence length", "usable on NVIDIA GeForce RTX 4090",
                  "longest that fits", "activations", "this plan: 2,048 tokens"):
        assert label in text, label
    assert "rtx-3090" not in text  # the card lines only with the fit table
    assert _plan("--plot", str(tmp_path / "t.svg")).exit_code == 0
    assert "rtx-3090" in (tmp_path / "t.svg").read_text(encoding="utf-8")


def test_plot_memory_follows_the_memory_model():
    """The curve at the plan's own length is the plan's prediction, term by term, and grows with the length."""
    import loraplan
    from loraplan.planner.report.plot import longest_fitting, memory_curve

    res = loraplan.plan("llama-3.1-8b", gpu="rtx-4090", method="qlora", fit_table=False)
    names, stacks = memory_curve(res, [1024, res.plan.training.seq_len, 8192])
    at_plan = {n: s[1] for n, s in zip(names, stacks)}
    assert at_plan == pytest.approx({t.name: t.gib for t in res.terms})
    totals = [sum(s[i] for s in stacks) for i in range(3)]
    assert totals[0] < totals[1] < totals[2]
    longest = longest_fitting(res, 1 << 17)
    assert longest >= res.plan.training.seq_len and longest % 256 == 0
    assert sum(s[0] for s in memory_curve(res, [longest + 256])[1]) > res.usable_gib


def test_plot_bad_extension_is_one_line(tmp_path):
    one_line_error(_plan("--plot", str(tmp_path / "m.gif")), 2, "--plot", ".png or .svg")


def test_plan_without_plot_does_not_import_matplotlib():
    code = ("import sys; from loraplan.cli import main; sys.argv=['loraplan','plan','llama-3.1-8b','--gpu','rtx-4090'];\n"
            "try: main()\nexcept SystemExit: pass\nassert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_loss_plot_reads_metrics(tmp_path):
    import matplotlib.image as mpimg

    from loraplan.executor.plots import plot_loss, plot_memory_check

    rows = [{"kind": "train", "step": s, "loss": 3.0 / s} for s in range(1, 11)] + [
        {"kind": "eval", "step": 10, "eval_loss": 0.5}]
    path = plot_loss(rows, str(tmp_path / "loss.png"), title="tiny")
    height, width = mpimg.imread(path).shape[:2]
    assert (width, height) == (840, 480)  # 7 x 4 in at 120 dpi
    svg = plot_loss(rows, str(tmp_path / "loss.svg"))
    text = open(svg, encoding="utf-8").read()
    assert "train loss" in text and "eval loss" in text and "optimizer step" in text
    mem = plot_memory_check({"weights": 10.0, "activations": 5.0}, [14.2, 14.9], 24.0, 0.1,
                            str(tmp_path / "memory.svg"), title="tiny on a card")
    text = open(mem, encoding="utf-8").read()
    assert "observed peak" in text and "GPU 1" in text and "usable 21.6 GiB" in text
