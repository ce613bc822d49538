"""``python -m qjax.quantize`` with activation quantization end to end on stories260K: planted outliers,
SmoothQuant, the int8 path, save and reload (the activation quantizer travels with the checkpoint), LLM.int8."""
import concurrent.futures
import json
import os
import subprocess
import sys

COMMON = ["--seqlen", "64", "--eval-nsamples", "8", "--no-progress"]


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
  return subprocess.run([sys.executable, "-m", "qjax.quantize", *COMMON, *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=600)


def test_smoothquant_w8a8_int8_round_trip_and_llm_int8(tmp_path):
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    sq = pool.submit(_run, "--method", "rtn", "--wbits", "8", "--abits", "8", "--plant-outliers", "4",
                     "--smoothquant", "--alpha", "0.5", "--nsamples", "8", "--calib-seqlen", "64", "--int8-kernel",
                     "--baseline", "--save", tmp_path / "ck", "--json", tmp_path / "sq.json")
    li8 = pool.submit(_run, "--method", "llm_int8", "--plant-outliers", "4", "--json", tmp_path / "li8.json")
    r = sq.result()
    assert r.returncode == 0, r.stderr
    reload = pool.submit(_run, "--load", tmp_path / "ck", "--json", tmp_path / "load.json")
    r2, r3 = reload.result(), li8.result()
  out = json.loads((tmp_path / "sq.json").read_text())
  cfg = out["config"]
  assert cfg["matmul_path"] == "int8 (int8 x int8 -> int32 dot_general)"
  assert cfg["activations"].startswith("8-bit per-token asym")
  assert cfg["method"]["activation"]["bits"] == 8 and cfg["method"]["smoothquant"] == {"alpha": 0.5}
  assert cfg["method"]["outliers"]["channels"] == 4
  assert len(out["smoothquant"]["layers"]) == 5
  q, fp = out["ppl"]["tinystories"], out["ppl_baseline"]["tinystories"]
  assert fp < q < 1.03 * fp
  assert "smoothquant+rtn W8A8 ppl" in r.stdout and "int8 x int8" in r.stdout
  assert r2.returncode == 0, r2.stderr
  loaded = json.loads((tmp_path / "load.json").read_text())
  assert loaded["config"]["matmul_path"] == cfg["matmul_path"]
  assert abs(loaded["ppl"]["tinystories"] / q - 1) < 1e-6
  assert r3.returncode == 0, r3.stderr
  out3 = json.loads((tmp_path / "li8.json").read_text())
  assert out3["config"]["matmul_path"].startswith("LLM.int8")
  assert 8.0 < out3["size"]["bits_per_weight"] < 8.6
