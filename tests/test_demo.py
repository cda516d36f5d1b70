import math

from overfill.demo.run import _write_report, gap_closed, verdict


def test_gap_share_and_verdict():
    assert gap_closed(1.0, 2.0, 1.5) == 0.5
    assert math.isnan(gap_closed(1.2, 0.22, 0.20))  # decoders beat the untuned full model: no gap
    nll, nll_all = {"full": 1.0, "pruned": 2.0, "overfill": 1.5}, {"full": 1.1, "pruned": 2.2, "overfill": 1.6}
    assert "closes 50% of the pruned-to-full gap" in verdict(nll, nll_all, 0.5)
    text = verdict({"full": 1.2, "pruned": 0.22, "overfill": 0.2}, nll_all, float("nan"))
    assert "no pruned-to-full gap" in text and "0.200 vs 0.220" in text


def test_report_lists_every_model(tmp_path):
    models = {name: {"mode": mode, "nll": nll, "nll_all": nll + 0.1, "ppl": math.exp(nll), "top1": 0.5,
                     "answers": {"accuracy": 0.25}}
              for name, mode, nll in (("full", "full", 1.0), ("pruned", "pruned", 2.0), ("overfill", "overfill", 1.5))}
    summary = {"config": {"model": "m", "ratio": 0.45, "steps": 3, "batch_size": 2, "lr": 1e-3, "heldout": 4},
               "verdict": "OverFill wins.", "seconds": 90}
    _write_report(tmp_path, summary, {"models": models}, tmp_path / "validation_loss.png")
    report = (tmp_path / "report.md").read_text()
    assert "| overfill | overfill | 1.500 | 1.600 |" in report and "**OverFill wins.**" in report
    assert "1.5 min" in report
