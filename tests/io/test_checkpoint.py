"""Checkpoint type resolution: only qjax's own stored formats, with the pre-move module names as aliases."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qjax.core import tree
from qjax.core.errors import InputError
from qjax.io import checkpoint
from qjax.io.hf import load_model
from qjax.methods.weights import rtn


@pytest.fixture(scope="module")
def saved(llama_dir, tmp_path_factory):
  _, params = load_model(llama_dir)
  q, _ = rtn.quantize(params, rtn.RTNConfig(bits=4, group_size=16), progress=False)
  dest = tmp_path_factory.mktemp("ckpt") / "ckpt"
  checkpoint.save(dest, q, source_dir=llama_dir, dtype="float32", method={"name": "rtn", "config": {}})
  return dest, q


def _set_modules(dest, module):
  meta = json.loads((dest / "qjax.json").read_text())
  for static in meta["qarrays"].values():
    static["module"] = module
  (dest / "qjax.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("module", ["qjax.core.formats.qarray", "qjax.qarray"])
def test_current_and_legacy_module_names_load(saved, module):
  dest, q = saved
  _set_modules(dest, module)
  back, _ = checkpoint.load_params(dest)
  want, got = tree.flatten(q), tree.flatten(back)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(want[k].dequantize() if hasattr(want[k], "dequantize") else want[k]),
                                  np.asarray(got[k].dequantize() if hasattr(got[k], "dequantize") else got[k]))


@pytest.mark.parametrize("module", ["os.path", "qjax.methods.weights.rtn", "qjax.core.formats.int8"])
def test_other_modules_are_refused(saved, module):
  dest, _ = saved
  _set_modules(dest, module)
  with pytest.raises(InputError, match="not one of qjax|unknown quantized tensor type"):
    checkpoint.load_params(dest)
  _set_modules(dest, "qjax.core.formats.qarray")
