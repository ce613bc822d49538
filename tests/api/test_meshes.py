"""Sharded quantization against one device: ``eval/mesh_parity.py`` on stories260K with 8 forced host devices
(a subprocess: the device count is fixed when JAX starts), GPTQ act-order g32 under ``data=2,model=4`` (windows
and each linear's rows split over all 8 devices, FSDP and tensor-parallel weights for evaluation): the Hessians'
fixed summation tree makes every code equal one device's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gptq_perplexity_and_generation_under_a_mesh_equal_one_device(tmp_path):
  out = tmp_path / "mesh.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  r = subprocess.run([sys.executable, "eval/mesh_parity.py", "--model", "stories260k", "--methods", "gptq",
                      "--meshes", "data=2,model=4", "--group-size", "32", "--nsamples", "8", "--seqlen", "128",
                      "--eval-windows", "4", "--new-tokens", "8", "--json", str(out)],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["devices"] == 8
  fp = res["float"]["data=2,model=4"]
  assert fp["greedy_identical"] and fp["ppl_rel_diff"] < 1e-5
  g = res["methods"]["gptq"]["data=2,model=4"]
  assert g["weights"] > 200_000 and g["codes_equal"] == 1.0
  assert g["ppl_rel_diff"] < 1e-5 and g["greedy_identical"]
  assert res["methods"]["gptq"]["1 device"]["ppl"] > res["float"]["1 device"]["ppl"]   # quantization did act
