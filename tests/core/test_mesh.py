"""Mesh and process configs: parsing, validation, and which array axes a mesh may split."""
from __future__ import annotations

import pytest

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
