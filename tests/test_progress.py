"""Progress bars redraw rarely into a log (stderr not a terminal) and freely in a terminal."""
import io
import sys

from masksc.progress import LOG_REFRESH_S, progress_bar


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_bars_redraw_rarely_into_a_log(monkeypatch):
    for tty, expected in ((False, LOG_REFRESH_S), (True, 0.1)):
        stream = _Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress_bar(range(1000), file=stream)
        assert bar.mininterval == expected
        for _ in bar:
            bar.set_postfix(loss="1.0", refresh=False)
        if not tty:  # 1000 fast steps: the first draw and the closing one, no per-step lines
            assert stream.getvalue().count("\r") <= 3
    assert progress_bar(range(3), mininterval=0.5, file=_Stream(False)).mininterval == 0.5
