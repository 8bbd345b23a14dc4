"""``python -m masksc``: the ``masksc`` command."""
import sys

from masksc.cli import main

if __name__ == "__main__":
    sys.exit(main())
