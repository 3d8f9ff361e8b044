"""``python -m herald``: the ``herald`` command (:mod:`herald.cli`), for when its script is not on the PATH."""

from __future__ import annotations

import sys

from herald.cli import main

if __name__ == "__main__":
    sys.exit(main())
