"""``python -m qjax.quantize``: runs :func:`qjax.cli.quantize.main` (the command line lives in :mod:`qjax.cli`)."""
from __future__ import annotations

import sys

from qjax.cli.quantize import main

if __name__ == "__main__":
  sys.exit(main())
