"""Where the shared assets live (one setting: ``QJAX_ASSETS``) and the named text sets."""
from __future__ import annotations

import os
from pathlib import Path

from qjax.core.errors import InputError

DEFAULT_MODEL = "models/stories260K"
PPL_DATASETS = {
    "tinystories": "text/tinystories/eval.txt",
    "wikitext2": "text/wikitext2/wiki.test.raw.nonempty_lines.txt",
}
CALIB_DATASETS = {
    "tinystories": "text/tinystories/calib.txt",
    "wikitext2": "text/wikitext2/wiki.valid.tokens",
}


def assets_dir() -> Path:
  """``$QJAX_ASSETS``, else ``../shared/assets`` relative to the repository root."""
  env = os.environ.get("QJAX_ASSETS")
  return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "assets"


def asset(rel: str) -> Path:
  return assets_dir() / rel


def named_text(name: str, table: dict[str, str]) -> Path:
  if name not in table:
    raise InputError(f"unknown dataset {name!r}; known: {', '.join(table)}")
  path = asset(table[name])
  if not path.is_file():
    raise InputError(f"dataset {name!r} not found at {path} (set QJAX_ASSETS)")
  return path
