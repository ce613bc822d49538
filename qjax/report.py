"""``python -m qjax.report``: runs :func:`qjax.cli.report.main` (the command line lives in :mod:`qjax.cli`)."""
from __future__ import annotations

import sys

from qjax.cli.report import main

if __name__ == "__main__":
  sys.exit(main())
