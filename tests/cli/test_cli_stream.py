"""``python -m qjax.quantize --stream``: GPTQ layer by layer into the checkpoint, the same arrays as the in-memory
``--save`` (also under a 4-device mesh), an evaluable output, and the refusals (exit 2, one line, nothing
written)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from qjax.core import tree
from qjax.io import checkpoint


def _run(*args, devices: int = 1):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.run([sys.executable, "-m", "qjax.quantize", "--no-progress", *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=600)


GPTQ = ("--method", "gptq", "--wbits", "4", "--groupsize", "32", "--nsamples", "8", "--calib-seqlen", "64")


def test_stream_writes_the_in_memory_checkpoint(tmp_path):
  r = _run(*GPTQ, "--stream", "--save", tmp_path / "streamed", "--json", tmp_path / "s.json")
  assert r.returncode == 0, r.stderr
  assert "streamed" in r.stdout and "estimated peak memory" in r.stdout and "Traceback" not in r.stderr
  out = json.loads((tmp_path / "s.json").read_text())
  assert out["stream"]["resumed_layers"] == 0 and len(out["calibration"]["layers"]) == 5
  assert out["stream"]["memory"]["total_bytes"] > out["stream"]["memory"]["activation_bytes"] > 0
  m = _run(*GPTQ, "--eval", "none", "--save", tmp_path / "memory")
  assert m.returncode == 0, m.stderr
  a, meta_a = checkpoint.load_params(tmp_path / "streamed")
  b, meta_b = checkpoint.load_params(tmp_path / "memory")
  fa, fb = tree.flatten(a), tree.flatten(b)
  assert fa.keys() == fb.keys() and meta_a["qarrays"] == meta_b["qarrays"]
  for p in fa:
    codes = lambda v: np.asarray(getattr(v, "codes", v))
    np.testing.assert_array_equal(codes(fa[p]), codes(fb[p]))
  sharded = _run(*GPTQ, "--stream", "--save", tmp_path / "sharded", "--mesh", "data=2,model=2", devices=4)
  assert sharded.returncode == 0, sharded.stderr
  c, _ = checkpoint.load_params(tmp_path / "sharded")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):      # a mesh streams the same bits
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  e = _run("--load", tmp_path / "streamed", "--method", "none", "--seqlen", "64", "--eval-nsamples", "4")
  assert e.returncode == 0 and "ppl" in e.stdout, e.stderr
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stream_refusals_exit_2_and_write_nothing(tmp_path):
  dest = tmp_path / "out"
  stage = tmp_path / ".out.stream"
  cases = [(("--method", "gptq", "--resume", "--save", dest), "add --stream"),
           ((*GPTQ, "--stream"), "give --save"),
           ((*GPTQ, "--stream", "--save", dest, "--baseline"), "--baseline cannot be combined"),
           (("--method", "rtn", "--stream", "--save", dest), "layer-wise calibrated"),
           ((*GPTQ, "--stream", "--save", dest, "--resume"), "nothing to resume")]
  for args, msg in cases:
    r = _run(*args)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
  assert list(tmp_path.iterdir()) == []
  stage.mkdir()
  r = _run(*GPTQ, "--stream", "--save", dest)
  assert r.returncode == 2 and "--resume" in r.stderr and not dest.exists()
