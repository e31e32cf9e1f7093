"""Progress bars that read right in a terminal and in a log file.

    from nanochat.progress import progress_bar
    for x, y in progress_bar(loader, total=steps, desc="val bpb"): ...
    bar = progress_bar(total=num_iterations, initial=step, desc="chat_sft", unit="step")
    bar.update(1); bar.close()

In a terminal this is a plain tqdm bar on stderr, redrawn in place. In a log file (stderr redirected) a bar
redrawn with carriage returns leaves its frames and the next log line on one line, so there the bar prints
its status as a whole line instead, at most every LOG_INTERVAL_S seconds and once when it closes. Only rank 0
shows a bar. Log lines (nanochat.common's handler) go through tqdm.write, which lifts a terminal bar out of
the way and draws it again below the line.

The total is what will really run: pass the number of steps, items or seconds the loop will do, not a
nominal figure it may stop short of.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable

from tqdm import tqdm

from nanochat.common import get_rank

LOG_INTERVAL_S = 30.0  # a log file gets a status line at most this often


class LogLineBar(tqdm):
    """tqdm that writes its status as whole lines, for a stream that is not a terminal: no carriage
    returns, no clearing, no redraw after each tqdm.write (only when LOG_INTERVAL_S has passed)."""

    def __init__(self, *args, **kwargs):
        self._line_t, self._line = float("-inf"), ""
        super().__init__(*args, leave=False, mininterval=LOG_INTERVAL_S, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None, force: bool = False) -> bool:
        if msg == "":  # tqdm asks to clear the bar: a written line stays where it is
            return False
        now, line = time.time(), str(self) if msg is None else msg
        if line == self._line or (not force and now - self._line_t < LOG_INTERVAL_S):
            return False
        self._line_t, self._line = now, line
        self.fp.write(line + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock: bool = False) -> None:
        pass

    def close(self) -> None:
        if not self.disable:
            self.display(force=True)  # the final count, elapsed time and rate
        super().close()


def progress_bar(iterable: Iterable | None = None, total: float | None = None, desc: str | None = None,
                 unit: str = "it", initial: float = 0, disable: bool | None = None) -> tqdm:
    """A bar on stderr (rank 0 only unless `disable` says otherwise): tqdm in a terminal, LogLineBar
    in a log file."""
    if disable is None:
        disable = get_rank() != 0
    cls = tqdm if sys.stderr.isatty() else LogLineBar
    return cls(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=sys.stderr,
               dynamic_ncols=True)
