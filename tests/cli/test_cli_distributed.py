"""Two processes on 127.0.0.1 (``jax.distributed``, CPU backend with gloo collectives), one device each, under
``--mesh data=2``: each process embeds and runs only its own calibration windows, the Hessians are all-reduced
across the processes, process 0 alone prints and writes. The result equals a one-process run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import qjax
from qjax.core import tree

REPO = Path(__file__).resolve().parents[2]
FLAGS = ["--method", "gptq", "--wbits", "4", "--groupsize", "32", "--nsamples", "8", "--calib-seqlen", "128",
         "--seqlen", "128", "--eval-nsamples", "4", "--no-progress"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args, **env):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
  return subprocess.Popen([sys.executable, "-m", "qjax.quantize", *FLAGS, *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _codes(path):
  flat = tree.flatten(qjax.load(str(path)).params)
  return {p: np.asarray(v.unpacked_codes()) for p, v in flat.items() if hasattr(v, "unpacked_codes")}


def test_two_processes_equal_one(tmp_path):
  port = _free_port()
  common = ["--mesh", "data=2", "--json", str(tmp_path / "multi.json"), "--save", str(tmp_path / "multi")]
  workers = [_start([*common, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"],
                    QJAX_PROCESS_ID=str(i)) for i in range(2)]       # the id from the environment
  single = _start(["--json", str(tmp_path / "single.json"), "--save", str(tmp_path / "single")])
  outs = [p.communicate(timeout=600) for p in (*workers, single)]
  for p, (stdout, stderr) in zip((*workers, single), outs):
    assert p.returncode == 0, stderr[-3000:]
  assert "tinystories" in outs[0][0] and "tinystories" not in outs[1][0]   # process 1 prints no summary
  multi, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("multi", "single"))
  assert abs(multi["ppl"]["tinystories"] - one["ppl"]["tinystories"]) <= 1e-5 * one["ppl"]["tinystories"]
  a, b = _codes(tmp_path / "multi"), _codes(tmp_path / "single")
  assert a.keys() == b.keys() and len(a) == 5 * 7
  same = sum(int((a[p] == b[p]).sum()) for p in a) / sum(v.size for v in a.values())
  assert same >= 0.999, same
