import logging

from breastvision.training.progress import LogLines


def test_log_lines_report_tenths_of_slow_loops(caplog, monkeypatch):
    monkeypatch.setattr(LogLines, "QUIET_S", 0.0)
    with caplog.at_level(logging.INFO, logger="breastvision.training.progress"):
        bar = LogLines(20, "caching busi")
        for _ in range(20):
            bar.advance(loss=0.25)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[-1].startswith("caching busi 20/20") and "loss 0.2500" in lines[-1]


def test_log_lines_stay_quiet_for_quick_loops(caplog):
    with caplog.at_level(logging.INFO, logger="breastvision.training.progress"):
        bar = LogLines(50, "epoch 1")
        for _ in range(50):
            bar.advance(loss=0.1)
    assert caplog.records == []
