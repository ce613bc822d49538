"""Mesh and process configs: parsing, validation, which array axes a mesh may split, and the fixed summation tree
of per-row statistics (its mesh side: tests/api/test_meshes.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.core import mesh
from qjax.core.errors import InputError
from qjax.core.mesh import MeshConfig, ProcessConfig, fit_spec


def test_mesh_flags_parse_and_validate():
  assert MeshConfig.parse("data=2,model=4") == MeshConfig(data=2, model=4)
  assert MeshConfig.parse(" model=8 ") == MeshConfig(model=8) and MeshConfig.parse("data=8").size == 8
  for bad, why in (("data=2,rows=4", "axes"), ("data=two", "integer"), ("data=0", "positive"),
                   ("data=2,data=2", "twice"), ("data", "expected")):
    with pytest.raises(InputError, match=why):
      MeshConfig.parse(bad)
  with pytest.raises(InputError, match="needs 8 devices, JAX sees 1"):
    MeshConfig(data=8).build()
  assert dict(MeshConfig().build().shape) == {"data": 1, "model": 1}


def test_process_config_needs_a_coordinator_and_a_valid_id():
  ProcessConfig().initialize()                      # one process: nothing to do
  with pytest.raises(InputError, match="coordinator"):
    ProcessConfig(num_processes=2)
  with pytest.raises(InputError, match="process-id"):
    ProcessConfig(coordinator="127.0.0.1:1234", num_processes=2, process_id=2)
  with pytest.raises(InputError, match="coordinator"):
    ProcessConfig(coordinator="localhost", num_processes=2)


class _FakeMesh:
  shape = {"data": 2, "model": 4}


def test_fit_spec_splits_only_what_divides():
  m = _FakeMesh()
  assert tuple(fit_spec(m, (576, 1536), ("model", "data"))) == ("model", "data")
  assert tuple(fit_spec(m, (9, 64), ("model", "data"))) == (None, "data")     # 9 rows over 4: whole
  assert tuple(fit_spec(m, (64, 6), (("data", "model"),))) == (("data", "model"), None)
  assert tuple(fit_spec(m, (12, 6), (("data", "model"),))) == (None, None)     # 12 % 8
  assert tuple(fit_spec(m, (16,), ())) == (None,)


def _pairwise(rows):
  """The reference tree: 2^L chunks of m rows summed in order, chunks summed pairwise (float32 throughout)."""
  n = len(rows)
  chunks = n & -n
  parts = []
  for c in range(chunks):
    acc = np.float32(0) * rows[0]
    for r in rows[c * (n // chunks):(c + 1) * (n // chunks)]:
      acc = acc + r
    parts.append(acc)
  while len(parts) > 1:
    parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
  return parts[0]


def test_reduce_rows_sums_in_the_fixed_pairwise_tree():
  rng = np.random.default_rng(0)
  for n in (1, 6, 12, 16):        # m = n / 2^L odd: 1, 3, 3, 1
    xs = (rng.standard_normal((n, 33)) * 10.0 ** rng.integers(-4, 5, (n, 1))).astype(np.float32)
    got = jax.jit(lambda x: mesh.reduce_rows(lambda c, r: r * c, jnp.add, jnp.zeros(33, jnp.float32),
                                             jnp.float32(1), x, None))(xs)
    np.testing.assert_array_equal(np.asarray(got), _pairwise(list(xs)))
    assert not np.array_equal(_pairwise(list(xs)), np.cumsum(xs, 0, dtype=np.float32)[-1]) or n < 6
  top = jax.jit(lambda x: mesh.reduce_rows(lambda c, r: r, jnp.maximum, jnp.full(33, -jnp.inf), None, x, None))(xs)
  np.testing.assert_array_equal(np.asarray(top), xs.max(0))
