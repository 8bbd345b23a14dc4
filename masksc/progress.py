"""Progress bars: tqdm, refreshed rarely when stderr is not a terminal (a batch job's log)."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_REFRESH_S = 30.0  # a bar redraw in a log file is a line; a terminal redraws in place


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, at most one redraw per ``LOG_REFRESH_S`` seconds unless
    stderr is a terminal (or ``mininterval`` is given). Set postfixes with ``refresh=False``
    so they wait for the next redraw too."""
    if "mininterval" not in kwargs and not sys.stderr.isatty():
        kwargs["mininterval"] = LOG_REFRESH_S
    return tqdm(iterable, **kwargs)
