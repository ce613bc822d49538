"""The Pallas Mosaic TPU ``kivi_attention`` kernel: the shared grid in interpret mode (off TPU), several store chunks
with lengths ending mid-store under TPU interpret mode, many queries, its Mosaic TPU lowering on a CPU-only machine,
and checks that the comparison catches a wrong kernel."""
from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from kernel_base import KIVI_GRID, KIVIAttentionBase, kivi_operands, numpy_kivi_attention

from qjax.kernels.kivi_attention import OP, pallas_tpu


class TestKIVIAttentionPallasTPU(KIVIAttentionBase):
  implementation = "pallas_tpu"


def _case(**kw):
  base = dict(h=4, kvh=2, d=64, L=64, P=5, b=2, t=2, bits=4, G=32, dtype="float32", scale_dtype="float32")
  return {**base, **kw}


def _operands(case):
  return kivi_operands(case, np.random.default_rng(zlib.crc32(repr(sorted(case.items())).encode())))


def _check(got, ops, scale, tol=2e-5):
  want = numpy_kivi_attention(*ops, scale)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol, atol=tol * np.abs(want).max())


def test_registered_for_kivi_tensors():
  """The shared grid above runs this kernel, not the spec (the dispatcher accepts any implementation name)."""
  keys = _operands(_case())[1]
  assert OP.select(None, keys, implementation="pallas_tpu")[0] == ("pallas_tpu", pallas_tpu.pallas_tpu)


def test_chunk_sizes():
  assert pallas_tpu.choose_chunk(2048, 32, jnp.float16) == 512      # 16 key groups of 32 (16-bit scale tiles)
  assert pallas_tpu.choose_chunk(2048, 64, jnp.bfloat16) == 1024
  assert pallas_tpu.choose_chunk(2048, 32, jnp.float32) == 512      # two units of lcm(128, 8 * 32)
  assert pallas_tpu.choose_chunk(320, 32, jnp.float16) == 320       # one chunk: blocks are the full dims


def test_chunks_and_length_mid_store():
  """Three chunks of 256 tokens of which the last is a partial edge block; row 0 ends mid second chunk (its third
  chunk is skipped), row 1 reads the whole store. Row 0's store past its length is poisoned with NaN scales and
  minima, and TPU interpret mode reads uninitialized scratch and the out-of-bounds padding of the edge block as NaN:
  the output must still equal the spec of the clean store."""
  case = _case(L=640, P=7, bits=3)
  q, keys, values, *rest = _operands(case)
  length = jnp.asarray([320, 640], jnp.int32)
  ops = (q, keys, values, *rest[:-1], length)
  dead = np.arange(640) >= 320                              # row 0's tokens past its length

  def poison(a, tokens):                                    # NaN at row 0's ``tokens`` (axis 2)
    return jnp.where(jnp.asarray(tokens)[None, None, :, None] & (jnp.arange(2) == 0)[:, None, None, None], jnp.nan, a)

  bad_keys = dataclasses.replace(keys, scale=poison(keys.scale, dead[::32]), mn=poison(keys.mn, dead[::32]))
  bad_values = dataclasses.replace(values, scale=poison(values.scale, dead), mn=poison(values.mn, dead))
  scale = case["d"] ** -0.5
  params = pltpu.InterpretParams(out_of_bounds_reads="uninitialized")
  f = jax.jit(lambda *a: pallas_tpu.kivi_attention_pallas(*a, scale, chunk=256, interpret=params))
  _check(f(q, bad_keys, bad_values, *rest[:-1], length), ops, scale)


def test_many_queries_and_float16():
  """Ten queries over one KV head (the one-hot row expansion of the masks), float16 queries and scales."""
  case = _case(h=2, kvh=1, t=10, P=12, L=96, bits=2, dtype="float16", scale_dtype="float16")
  ops = _operands(case)
  scale = case["d"] ** -0.5
  got = jax.jit(lambda *a: pallas_tpu.kivi_attention_pallas(*a, scale))(*ops)
  assert got.dtype == jnp.float16 and got.shape == ops[0].shape
  _check(got, ops, scale, tol=2e-3)


def test_unsupported_head_dim_raises():
  """A packed row of 9 bytes (head_dim 20 at 3 bits) is no whole number of int32 words."""
  case = _case(d=20, L=40, bits=3, G=20)
  ops = _operands(case)
  with pytest.raises(NotImplementedError, match="packed bytes"):
    pallas_tpu.kivi_attention_pallas(*ops, 20**-0.5)


def test_wrong_kernel_is_detected():
  """The comparison fails for the first key group's scales 1% off, and for value minima off by 1% of a scale."""
  case = KIVI_GRID[0]
  q, keys, values, *rest = _operands(case)
  scale = case["d"] ** -0.5
  f = jax.jit(lambda *a: pallas_tpu.kivi_attention_pallas(*a, scale))
  _check(f(q, keys, values, *rest), (q, keys, values, *rest), scale)
  bad_keys = dataclasses.replace(keys, scale=keys.scale.at[:, :, 0, :].multiply(1.01))
  bad_values = dataclasses.replace(values, mn=values.mn + 0.01 * values.scale)
  for k, v in ((bad_keys, values), (keys, bad_values)):
    with pytest.raises(AssertionError):
      _check(f(q, k, v, *rest), (q, keys, values, *rest), scale)


_LOWER = [
    dict(h=8, kvh=2, d=64, L=2048, P=1, b=1, t=1, bits=2, G=32, dtype="float32", scale_dtype="float16"),   # 4 chunks
    dict(h=4, kvh=4, d=128, L=1024, P=40, b=2, t=3, bits=4, G=64, dtype="bfloat16", scale_dtype="bfloat16"),
    dict(h=9, kvh=3, d=64, L=320, P=159, b=1, t=1, bits=3, G=32, dtype="float32", scale_dtype="float32"),  # spills
    dict(h=9, kvh=3, d=128, L=4096, P=9, b=1, t=3, bits=8, G=32, dtype="bfloat16", scale_dtype="float16"),
]


@pytest.mark.parametrize("case", _LOWER, ids=lambda c: f"w{c['bits']}-g{c['G']}-L{c['L']}-{c['dtype']}")
def test_lowers_for_tpu(case):
  """The kernel lowers to a Mosaic custom call for a TPU v5e (lowering only: libtpu, which compiles it, is absent)."""
  ops = kivi_operands(case, np.random.default_rng(0))
  scale = case["d"] ** -0.5
  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  f = jax.jit(lambda *a: pallas_tpu.kivi_attention_pallas(*a, scale, interpret=False))
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
    text = f.trace(*ops).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text and f"kivi_attention_k{case['bits']}v{case['bits']}" in text
