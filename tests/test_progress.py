"""Progress bars and log lines: in a log file a bar is whole status lines (throttled, last one at the end);
in a terminal a log line goes through tqdm.write, above the bar instead of inside it."""
from __future__ import annotations

import io
import sys

import pytest

from nanochat import progress
from nanochat.common import log0
from nanochat.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_file_gets_whole_lines(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(total=100, desc="CORE", unit="item", disable=False)
    for i in range(100):
        bar.update(1)
        if i == 50:
            log0("copa acc 0.5000")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("CORE:   0%") and lines[-1].startswith("CORE: 100%") and "100/100" in lines[-1]
    assert lines[1] == "[nanochat] copa acc 0.5000" and len(lines) == 3  # throttled: no line per update


def test_log_file_lines_come_at_the_interval(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    for _ in progress_bar(range(4), desc="val bpb", disable=False):
        pass
    assert [line.split("|")[0].strip() for line in log.getvalue().splitlines()] == \
        ["val bpb:   0%", "val bpb:  25%", "val bpb:  50%", "val bpb:  75%", "val bpb: 100%"]  # the end once


def test_terminal_log_line_lands_outside_the_bar(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bar = progress_bar(total=10, desc="chat_sft", disable=False)
    bar.update(3)
    log0("step 00003 | val loss 1.2345")
    bar.update(7)
    bar.close()
    segments = screen.getvalue().split("\r")
    # the bar was cleared (carriage return) before the line, which ends before the bar is drawn again
    assert any(seg.startswith("[nanochat] step 00003 | val loss 1.2345\n") for seg in segments)


@pytest.mark.parametrize("rank,shown", [(0, True), (1, False)])
def test_only_rank_zero_shows_a_bar(monkeypatch, rank, shown):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress, "get_rank", lambda: rank)
    for _ in progress_bar(range(3), desc="samples"):
        pass
    assert ("samples" in log.getvalue()) is shown
