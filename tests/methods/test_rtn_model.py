"""Model-level RTN transform, size accounting and checkpoint round trips."""
import os

import jax
import numpy as np
import pytest

from qjax.io import checkpoint
from qjax.evaluation import size
from qjax.core import tree
from qjax.core.errors import InputError
from qjax.methods.weights import rtn
from qjax.core.formats.qarray import QArray
from qjax.io.hf import load_model


@pytest.mark.parametrize("fixture,n_linear", [("llama_dir", 7), ("opt_dir", 6)])
def test_quantize_replaces_exactly_the_decoder_linears(request, fixture, n_linear):
  model, params = load_model(request.getfixturevalue(fixture))
  q = rtn.quantize(params, rtn.RTNConfig(bits=4, group_size=32), progress=False)[0]
  flat, qflat = tree.flatten(params), tree.flatten(q)
  quantized = sorted(p for p, v in qflat.items() if isinstance(v, QArray))
  assert len(quantized) == n_linear * model.config.num_layers
  assert all(p.endswith("/weight") and "layers_" in p for p in quantized)
  for p in set(qflat) - set(quantized):  # embeddings, norms, biases, lm_head untouched
    assert qflat[p] is flat[p]
  assert isinstance(flat[quantized[0]], jax.Array)  # the input tree is not modified
  ids = np.arange(16, dtype=np.int32)[None] % model.config.vocab_size
  a, b = model.apply(params, ids)[0], model.apply(q, ids)[0]
  assert 0 < float(np.max(np.abs(np.asarray(a - b)))) < float(np.max(np.abs(np.asarray(a))))


def test_targets_can_include_lm_head(llama_dir):
  _, params = load_model(llama_dir)
  cfg = rtn.RTNConfig(bits=8, targets=("lm_head/weight",))
  q = rtn.quantize(params, cfg, progress=False)[0]
  assert [p for p, v in tree.flatten(q).items() if isinstance(v, QArray)] == ["lm_head/weight"]


def test_size_report_w4_g32(stories_dir):
  _, params = load_model(stories_dir)
  rep = size.size_report(rtn.quantize(params, rtn.RTNConfig(bits=4, group_size=32), progress=False)[0])
  # 4-bit codes + fp16 scale + uint8 zero per 32 weights = 4.75; FFN width 172 pads codes and adds a partial group
  assert 4.75 <= rep.bits_per_weight < 5.0
  assert rep.quantized_weights == 5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 172)  # q,o + k,v + gate,up,down
  assert rep.compression > 1.5


def test_checkpoint_round_trip_is_bit_identical(tmp_path, llama_dir):
  model, params = load_model(llama_dir)
  q = rtn.quantize(params, rtn.RTNConfig(bits=3, group_size=32, sym=True), progress=False)[0]
  before = {p: os.stat(p).st_mtime_ns for p in llama_dir.iterdir()}
  dest = checkpoint.save(tmp_path / "ck", q, source_dir=llama_dir, dtype="float32", method={"name": "rtn"})
  assert {p: os.stat(p).st_mtime_ns for p in llama_dir.iterdir()} == before
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ck.tmp-")]
  back, meta = checkpoint.load_params(dest)
  assert meta["method"] == {"name": "rtn"}
  fa, fb = tree.flatten(q), tree.flatten(back)
  assert fa.keys() == fb.keys()
  for p in fa:
    la, lb = jax.tree_util.tree_leaves(fa[p]), jax.tree_util.tree_leaves(fb[p])
    assert type(fa[p]) is type(fb[p]) and len(la) == len(lb)
    for x, y in zip(la, lb):
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(InputError, match="already exists"):
    checkpoint.save(dest, q, source_dir=llama_dir, dtype="float32", method={})
