"""The end-of-run loss summary: first/min/last, tail mean, sparkline and table."""
from corept.training.summary import format_loss_summary, loss_summary, sparkline

HISTORY = [{"loss": 4.0, "step": 1}, {"loss": 3.0, "step": 2}, {"grad_norm": 1.0, "step": 2},
           {"loss": 1.0, "step": 3}, {"loss": 2.0, "step": 4}, {"train_runtime": 3.0, "step": 4}]


def test_loss_summary_and_text():
    s = loss_summary(HISTORY)
    assert (s["first"], s["min"], s["last"], s["last_mean"], s["steps"]) == (4.0, 1.0, 2.0, 2.5, 4)
    text = format_loss_summary(HISTORY)
    assert "first 4.0000  min 1.0000  last 2.0000  (mean of the last 4: 2.5000; 4 logged steps)" in text
    assert "█▆▁▃" in text and "step     3  loss 1.0000" in text
    assert format_loss_summary([]) == "loss: (no training loss was logged)"


def test_sparkline_downsamples_and_handles_flat():
    assert len(sparkline([float(i) for i in range(500)], width=60)) == 60
    assert sparkline([2.0, 2.0, 2.0]) == "▁▁▁"
    assert sparkline([1.0, float("nan"), 3.0]) == "▁█"
