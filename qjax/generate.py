"""``python -m qjax.generate``: runs :func:`qjax.cli.generate.main` (the command line lives in :mod:`qjax.cli`)."""
from __future__ import annotations

import sys

from qjax.cli.generate import main

if __name__ == "__main__":
  sys.exit(main())
