"""``python -m masksc`` and the ``masksc`` command."""
import sys


def run() -> int:
    """The ``masksc`` command: :func:`masksc.cli.main`, with a Ctrl-C while its libraries load
    answered as one later is (a line, status 130), not a traceback."""
    try:
        from masksc.cli import main
    except KeyboardInterrupt:
        print("masksc: interrupted.", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
