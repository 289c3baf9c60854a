"""Live progress on a terminal, plain lines elsewhere; the rate and ETA leave start-up out."""

from __future__ import annotations

import io
import logging

import pytest

from raytorch.core.live import PredictDisplay, Rate, TrainDisplay, duration, live_wanted
from raytorch.engine.infer import PredictProgress, ProgressTracker, progress_line


def _console():
    from rich.console import Console

    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=160, color_system=None), out


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_rate_counts_from_the_first_update_so_start_up_is_not_a_rate():
    rate = Rate(total=1000)
    rate.update(100, now=50.0)  # the first unit arrived after 50 s of start-up
    assert rate.rate == 0 and rate.eta_s is None
    rate.update(300, now=52.0)
    assert rate.rate == pytest.approx(100.0)
    assert rate.eta_s == pytest.approx(7.0)


def test_the_first_inference_line_gives_no_eta_from_start_up():
    tracker = ProgressTracker(rows_total=4_000_000, units_total=40, rows_before=0)
    first = tracker.update(100_000, 1)
    assert first.eta_s is None and "left" not in progress_line(first)


def test_live_is_chosen_on_a_terminal_and_plain_elsewhere(monkeypatch):
    logging.getLogger("raytorch").setLevel(logging.INFO)
    monkeypatch.delenv("RAYTORCH_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert live_wanted(_Stream(tty=True)) is True
    assert live_wanted(_Stream(tty=False)) is False  # a log file, `ray job logs`
    monkeypatch.setenv("RAYTORCH_PROGRESS", "plain")
    assert live_wanted(_Stream(tty=True)) is False
    monkeypatch.setenv("RAYTORCH_PROGRESS", "live")
    assert live_wanted(_Stream(tty=False)) is True
    monkeypatch.setenv("RAYTORCH_PROGRESS", "auto")
    monkeypatch.setenv("TERM", "dumb")
    assert live_wanted(_Stream(tty=True)) is False


def _valid(iteration: int, value: float, best: float, best_it: int) -> dict:
    return {
        "kind": "valid",
        "iteration": iteration,
        "epoch": 1,
        "values": {"train/objective": 0.5, "valid/accuracy": value},
        "listen": "valid/accuracy",
        "best": best,
        "best_iteration": best_it,
        "line": f"iteration {iteration} epoch 1: valid/accuracy={value}",
    }


def test_training_display_on_a_terminal_shows_bar_rate_eta_values_best_and_restarts(caplog):
    console, out = _console()
    display = TrainDisplay(max_iterations=200, epochs=None, live=True, console=console)
    display.step({"iteration": 20, "epoch": 0, "samples": 640, "time": 100.0})
    display.step({"iteration": 120, "epoch": 1, "samples": 3840, "time": 102.0})
    with caplog.at_level(logging.INFO, logger="raytorch"):
        display.validation(_valid(120, 0.91, 0.93, 100))
    display.restart("a worker was lost")
    display.close()
    text = out.getvalue()
    assert "120/200" in text
    assert "1,600 samples/s" in text  # (3840 - 640) / 2 s
    assert "ETA 2s" in text  # 80 iterations left at 50 it/s
    assert "valid/accuracy=0.91" in text and "best valid/accuracy=0.93@100" in text
    assert "restarts 1" in text
    # The validation line still goes through the logger (printed above the bar on a terminal).
    assert caplog.messages == ["iteration 120 epoch 1: valid/accuracy=0.91"]


def test_training_display_counts_epochs_when_there_is_no_iteration_bound():
    console, out = _console()
    display = TrainDisplay(max_iterations=None, epochs=5, live=True, console=console)
    display.step({"iteration": 30, "epoch": 1, "samples": 0, "time": 1.0, "steps_per_epoch": 25})
    display.close()
    assert "epoch 2/5" in out.getvalue()


def test_off_a_terminal_training_prints_the_plain_validation_lines_only(caplog, capsys):
    display = TrainDisplay(max_iterations=200, epochs=None, live=False)
    with caplog.at_level(logging.INFO, logger="raytorch"):
        display.step({"iteration": 20, "epoch": 0, "samples": 640, "time": 100.0})
        display.validation(_valid(20, 0.5, 0.5, 20))
        display.restart("lost")
        display.close()
    assert [r.getMessage() for r in caplog.records] == ["iteration 20 epoch 1: valid/accuracy=0.5"]
    assert "\x1b[" not in capsys.readouterr().out  # no terminal control codes in a log


def test_inference_display_live_shows_rows_rate_eta_and_rejected():
    console, out = _console()
    display = PredictDisplay(rows_total=1000, live=True, console=console)
    update = PredictProgress(400, 1000, 4, 10, 200.0, 3.0, rows_rejected=7)
    display.update(update, progress_line(update))
    display.close()
    text = out.getvalue()
    assert "400/1,000 rows" in text and "200 rows/s" in text and "ETA 3s" in text
    assert "rejected 7" in text


def test_inference_display_plain_prints_at_most_every_interval_and_at_the_end(caplog):
    display = PredictDisplay(rows_total=1000, interval_s=3600, live=False)
    with caplog.at_level(logging.INFO, logger="raytorch"):
        for done in (100, 200, 1000):
            update = PredictProgress(done, 1000, 1, 10, 50.0, None, rows_rejected=2)
            display.update(update, progress_line(update))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["predict: 1,000/1,000 rows (100%), 50 rows/s, 2 rejected"]


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (None, 42, 185, 3725)] == ["?", "42s", "3m05s", "1h02m"]
