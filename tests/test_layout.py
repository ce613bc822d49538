"""The package layout's import direction: core -> kernels -> models -> methods -> calibration -> api -> io and
evaluation -> cli (a module may import its own layer and the layers before it, never a later one)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qjax

LAYERS = {"core": 0, "kernels": 1, "models": 2, "methods": 3, "calibration": 4, "api": 5, "io": 6, "evaluation": 6,
          "cli": 7}
ROOT = Path(qjax.__file__).parent
MODULES = sorted(p for p in ROOT.rglob("*.py"))


def _layer(module: str) -> int:
  """``qjax.<layer>...`` -> its rank; top-level modules (``qjax``, the ``quantize``/``generate``/``report`` entry points)
  sit above every layer."""
  parts = module.split(".")
  return LAYERS.get(parts[1], len(LAYERS)) if len(parts) > 1 else len(LAYERS)


def _imports(path: Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "qjax" else {node.module}
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
  return {m for m in out if m == "qjax" or m.startswith("qjax.")}


def _module(path: Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


def test_every_module_sits_in_a_named_layer():
  stray = [_module(p) for p in MODULES
           if _module(p).count(".") >= 1 and _module(p).split(".")[1] not in LAYERS
           and _module(p) not in ("qjax.quantize", "qjax.generate", "qjax.report")]
  assert not stray, f"modules outside the layered subpackages: {stray}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module(p))
def test_imports_flow_one_way(path):
  me = _module(path)
  upward = sorted(m for m in _imports(path) if _layer(m) > _layer(me))
  assert not upward, f"{me} (layer {_layer(me)}) imports later layers: {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from qjax.cli import common\nfrom qjax import api\n")
  assert {m for m in _imports(bad) if _layer(m) > _layer("qjax.methods.weights.rtn")} == {"qjax.cli", "qjax.api"}
