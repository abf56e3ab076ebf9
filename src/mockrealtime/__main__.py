"""``python -m mockrealtime``: the same as the ``mockrealtime`` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
