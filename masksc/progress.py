"""Progress bars: tqdm, refreshed rarely when stderr is not a terminal (a batch job's log)."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_REFRESH_S = 30.0  # a bar redraw in a log file is a line; a terminal redraws in place


# The interrupt a signal handler raised (the CLI's SIGTERM), until the command has caught it. Python
# drops an exception raised while it runs a garbage-collection callback (a __del__, a weakref's), as it
# does Ctrl-C's there; a bar's next step raises it again, so the signal is not lost in a long loop.
pending_interrupt: BaseException | None = None


class _Bar(tqdm):
    def __iter__(self):
        for item in super().__iter__():
            yield item
            if pending_interrupt is not None:
                raise pending_interrupt

    def update(self, n=1):
        shown = super().update(n)
        if pending_interrupt is not None:
            raise pending_interrupt
        return shown


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, at most one redraw per ``LOG_REFRESH_S`` seconds unless
    stderr is a terminal (or ``mininterval`` is given). Set postfixes with ``refresh=False``
    so they wait for the next redraw too. Each step (iterated or ``update()``) raises
    ``pending_interrupt`` when set."""
    if "mininterval" not in kwargs and not sys.stderr.isatty():
        kwargs["mininterval"] = LOG_REFRESH_S
    return _Bar(iterable, **kwargs)
