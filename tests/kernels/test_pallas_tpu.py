"""The Pallas Mosaic TPU ``qmatmul`` kernel: the shared grid in interpret mode (off TPU), edge tiles, its Mosaic TPU
lowering on a CPU-only machine, and checks that the comparison catches a wrong kernel."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from kernel_base import QMatmulBase, grid_qarray, numpy_qmatmul

from qjax.kernels.qmatmul import pallas_tpu
from qjax.methods.weights import rtn


class TestQMatmulPallasTPU(QMatmulBase):
  implementation = "pallas_tpu"


def _case(**kw):
  base = dict(n_in=576, n_out=40, m=2, bits=4, group_size=32, sym=False, perm=False, dtype="float32")
  return {**base, **kw}


def _check(got, x, q, tol=2e-5):
  want = numpy_qmatmul(np.asarray(x.astype(jnp.float32)), q)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol, atol=tol * np.abs(want).max())


def test_slot_table_covers_every_bit_once():
  for bits in range(1, 9):
    table = pallas_tpu.slot_table(bits)
    got = {}
    for word, parts in enumerate(table):
      for p in filter(None, parts):
        for b in range(p.nbits):
          got.setdefault(p.j, set()).add(p.lsh + b)
          assert 0 <= p.off + b < 32 and (p.low == (p.lsh == 0))
    assert got == {j: set(range(bits)) for j in range(32)}, bits


def test_edge_tiles_and_scale_blocks(monkeypatch):
  """A partial last ``out`` block (300 rows in tiles of 256), two K tiles of which the last is partial, and more than
  128 groups (scale blocks that move with the K step, the last one partial), under TPU interpret mode."""
  monkeypatch.setattr(pallas_tpu, "_TN_FULL_MAX", 128)
  case = _case(n_in=4200, n_out=300, perm=True)
  x, q = grid_qarray(case, np.random.default_rng(3))
  t = pallas_tpu.choose_tiling(2, 300, 4200, 4, 32, jnp.float32)
  assert (t.tn, t.nk, t.gb, t.tiled) == (256, 2, 128, True)
  params = pltpu.InterpretParams(out_of_bounds_reads="uninitialized")
  got = jax.jit(lambda x, q: pallas_tpu.qmatmul_pallas(x, q, interpret=params))(x, q)
  _check(got, x, q)


def test_other_widths_and_leading_dims():
  """5 bits (codes straddling words in a 5-word block) per channel, float16 activations with leading dims."""
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.normal(size=(24, 200)), jnp.float32)
  q = rtn.quantize_weight(w, bits=5, group_size=-1, scale_dtype="float16")
  x = jnp.asarray(rng.normal(size=(2, 3, 200)), jnp.float16)
  got = jax.jit(pallas_tpu.qmatmul_pallas)(x, q)
  assert got.shape == (2, 3, 24) and got.dtype == jnp.float16
  _check(got.reshape(6, 24), x.reshape(6, 200), q, tol=2e-3)


def test_unsupported_group_size_raises():
  q = rtn.quantize_weight(jnp.ones((8, 96)), bits=4, group_size=48)
  with pytest.raises(NotImplementedError, match="group size 48"):
    pallas_tpu.qmatmul_pallas(jnp.ones((1, 96)), q)


def test_wrong_kernel_is_detected():
  """The comparison fails for a scale off by 1% in one group of one row and for an ignored permutation."""
  x, q = grid_qarray(_case(perm=True), np.random.default_rng(7))
  f = jax.jit(pallas_tpu.qmatmul_pallas)
  _check(f(x, q), x, q)
  bad_scale = dataclasses.replace(q, scale=q.scale.at[5, 3].multiply(1.01))
  bad_perm = dataclasses.replace(q, perm=jnp.arange(q.shape[1], dtype=jnp.int32))
  for bad in (bad_scale, bad_perm):
    with pytest.raises(AssertionError):
      _check(f(x, bad), x, q)


@pytest.mark.parametrize("interpret", [True, pltpu.InterpretParams()], ids=["interpret", "tpu-interpret"])
def test_interpret_poisons_uninitialized_scratch(interpret):
  """Both interpret modes hand a kernel NaN scratch: a kernel that skipped the accumulator's zeroing at the first K
  step would fail the grid."""
  def kernel(x_ref, o_ref, acc_ref):
    acc_ref[...] += x_ref[...]
    o_ref[...] = acc_ref[...]
  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                       scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32)], interpret=interpret)(jnp.ones((8, 128)))
  assert np.isnan(np.asarray(out)).all()


_LOWER = [
    _case(m=1, n_in=8192, n_out=512, bits=4, group_size=-1),                        # decode, per channel, 2 K tiles
    _case(m=64, n_in=4096, n_out=384, bits=3, group_size=32, sym=True, perm=True, dtype="bfloat16"),    # 128 groups
    _case(m=1, n_in=8192, n_out=200, bits=3, group_size=32, perm=True, dtype="bfloat16"),  # 256 groups, full N
]


@pytest.mark.parametrize("case", _LOWER, ids=lambda c: f"m{c['m']}-w{c['bits']}-g{c['group_size']}-{c['dtype']}")
def test_lowers_for_tpu(case):
  """The kernel lowers to a Mosaic custom call for a TPU v5e (lowering only: libtpu, which compiles it, is absent)."""
  x, q = grid_qarray(case, np.random.default_rng(0))
  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  f = jax.jit(lambda x, q: pallas_tpu.qmatmul_pallas(x, q, interpret=False))
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
    text = f.trace(x, q).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text and f"qmatmul_w{case['bits']}" in text


@pytest.mark.parametrize("bits, n_in", [(2, 172), (4, 4200), (8, 1536)])
def test_reshaped_activations_equal_the_gather(bits, n_in):
  """Natural order at 2/4/8 bits uses a reshape + transpose instead of the general gather: the same ``x'``."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, n_in)), jnp.float32)
  t = pallas_tpu.choose_tiling(3, 16, n_in, bits, -1, jnp.float32)
  gathered = jnp.take(jnp.pad(x, ((0, t.tm - 3), (0, 0))), pallas_tpu._x_index(n_in, t), axis=1, mode="fill",
                      fill_value=0)
  np.testing.assert_array_equal(pallas_tpu._arrange(x, None, n_in, t, jnp.float32), gathered)
