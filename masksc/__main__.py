"""``python -m masksc``: the ``masksc`` command."""
import sys

from masksc.cli import main

sys.exit(main())
