"""pocl.progress: a tqdm bar on a terminal, plain log lines elsewhere (and with --no-progress), nothing
when both are off; the lines' content, their interval, the final line, and the TTY overrides."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from pocl.progress import (
    ENV_EVERY,
    ENV_MODE,
    format_seconds,
    make_progress,
    stderr_is_tty,
)


@pytest.fixture
def lines():
    """A logger whose records are collected as formatted lines (and a stream, to check for '\\r')."""
    logger = logging.getLogger("pocl.test_progress")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def read() -> list[str]:
        return stream.getvalue().splitlines()

    read.logger = logger
    read.stream = stream
    yield read
    logger.removeHandler(handler)


@pytest.mark.parametrize("bar,log,tty,mode", [
    (True, True, True, "bar"),     # a terminal: the bar
    (True, True, False, "log"),    # redirected: plain lines
    (False, True, True, "log"),    # --no-progress on a terminal: plain lines, not nothing
    (False, True, False, "log"),
    (False, False, True, "off"),   # both off: nothing
    (True, False, False, "off"),
])
def test_the_mode_follows_the_bar_flag_and_the_terminal(bar, log, tty, mode, capsys):
    p = make_progress(3, desc="x", bar=bar, log=log, tty=tty)
    try:
        assert p.mode == mode
    finally:
        p.close()


def test_the_environment_overrides_the_terminal_check(monkeypatch):
    monkeypatch.setenv(ENV_MODE, "bar")
    assert stderr_is_tty() is True
    monkeypatch.setenv(ENV_MODE, "log")
    assert stderr_is_tty() is False
    assert stderr_is_tty(True) is True  # the argument wins over the environment
    monkeypatch.setenv(ENV_MODE, "auto")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert stderr_is_tty() is False


def test_plain_lines_every_n_steps_with_rate_eta_and_postfix_then_a_final_line(lines):
    p = make_progress(10, desc="distill", unit="step", tty=False, every=3, logger=lines.logger)
    for step in range(1, 11):
        p.update(1, stage="1/2", loss=f"{1 / step:.4f}")
    p.close()
    out = lines()
    assert len(out) == 4, out  # steps 3, 6, 9, then the final line (10/10 is said by it)
    for line, n in zip(out, (3, 6, 9)):
        assert re.fullmatch(rf"distill: {n}/10 steps \({n * 10}%\), (\S+ steps/s|\S+ s/step), elapsed \d+:\d\d, "
                            rf"ETA (\d+:\d\d|\?), stage 1/2, loss {1 / n:.4f}", line), line
    assert re.fullmatch(r"distill: done 10/10 steps \(100%\) in \d+:\d\d \(.+\), stage 1/2, loss 0\.1000", out[-1])
    assert "\r" not in lines.stream.getvalue()
    assert p.lines == 4


def test_an_update_that_crosses_several_intervals_writes_one_line(lines):
    p = make_progress(100, desc="teacher cache (train)", unit="sample", tty=False, every=10, logger=lines.logger)
    p.update(35)
    p.update(3)
    p.update(2)
    assert [line.split(",")[0] for line in lines()] == ["teacher cache (train): 35/100 samples (35%)",
                                                         "teacher cache (train): 40/100 samples (40%)"]


def test_a_resumed_loop_counts_from_its_start_position(lines):
    p = make_progress(12, desc="distill", unit="step", tty=False, every=4, initial=5, logger=lines.logger)
    for _ in range(3):
        p.update(1)
    assert [line.split(",")[0] for line in lines()] == ["distill: 8/12 steps (67%)"]


def test_a_loop_that_stops_early_says_where(lines):
    p = make_progress(10, desc="distill", unit="step", tty=False, every=100, logger=lines.logger)
    p.update(4, loss="2.0000")
    p.close()
    p.close()  # closing twice writes nothing more
    assert len(lines()) == 1 and lines()[0].startswith("distill: stopped at 4/10 steps (40%) in ")


def test_set_total_shortens_the_loop(lines):
    p = make_progress(18, desc="distill", unit="step", tty=False, every=100, logger=lines.logger)
    p.update(4)
    p.set_total(6)  # a stage advanced early: 14 planned steps will not run
    p.update(2)
    p.close()
    assert lines() == [lines()[0]] and lines()[0].startswith("distill: done 6/6 steps (100%)")


def test_off_writes_nothing(lines):
    p = make_progress(5, desc="x", bar=False, log=False, logger=lines.logger)
    p.update(5)
    p.write("hello")
    p.close()
    assert lines() == []


def test_the_default_interval_is_a_tenth_and_can_be_set_by_the_environment(monkeypatch, caplog):
    monkeypatch.delenv(ENV_EVERY, raising=False)
    assert make_progress(1000, desc="x", tty=False).every == 100
    assert make_progress(7, desc="x", tty=False).every == 1
    monkeypatch.setenv(ENV_EVERY, "25")
    assert make_progress(1000, desc="x", tty=False).every == 25
    monkeypatch.setenv(ENV_EVERY, "often")
    with caplog.at_level(logging.WARNING, logger="pocl.progress"):
        assert make_progress(1000, desc="x", tty=False).every == 100
    assert "POCL_PROGRESS_EVERY='often' is not a positive whole number; ignored" in caplog.text


def test_the_bar_mode_draws_a_bar_and_writes_log_lines_above_it(capsys):
    """On a terminal: tqdm on stderr; a log line written meanwhile goes through tqdm.write, once."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        p = make_progress(4, desc="distill", unit="step", tty=True)
        assert p.mode == "bar"
        p.update(2, loss="1.0")
        logging.getLogger("pocl.train").info("step 2: a dev line")
        p.update(2)
        p.close()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    err = capsys.readouterr().err
    assert "distill" in err and "4/4" in err
    assert err.count("[pocl.train] step 2: a dev line") == 1
    assert root.handlers.count(handler) == 0  # the redirect was undone


def test_format_seconds():
    assert format_seconds(0) == "0:00"
    assert format_seconds(75.4) == "1:15"
    assert format_seconds(3 * 3600 + 62) == "3:01:02"
    assert format_seconds(float("nan")) == "?" and format_seconds(-1) == "?"
