"""``python -m qjax.quantize`` with activation quantization end to end on stories260K: planted outliers,
SmoothQuant, the int8 path, save and reload (the activation quantizer travels with the checkpoint), LLM.int8,
ZeroQuant with LKD, AWQ."""
import concurrent.futures
import json
import os
import subprocess
import sys

from qjax.kernels.qmatmul import cpu as qmatmul_cpu

COMMON = ["--seqlen", "64", "--eval-nsamples", "8", "--no-progress"]


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
  return subprocess.run([sys.executable, "-m", "qjax.quantize", *COMMON, *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=600)


def test_smoothquant_w8a8_int8_round_trip_and_llm_int8_zeroquant_awq(tmp_path):
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    zq = pool.submit(_run, "--method", "zeroquant", "--wbits", "4", "--abits", "8", "--zq-lkd", "--lkd-steps", "5",
                     "--nsamples", "4", "--calib-seqlen", "32", "--int8-kernel", "--json", tmp_path / "zq.json")
    aw = pool.submit(_run, "--method", "awq", "--wbits", "4", "--groupsize", "32", "--nsamples", "4",
                     "--calib-seqlen", "32", "--awq-grid", "4", "--json", tmp_path / "awq.json")
    sq = pool.submit(_run, "--method", "rtn", "--wbits", "8", "--abits", "8", "--plant-outliers", "4",
                     "--smoothquant", "--alpha", "0.5", "--nsamples", "8", "--calib-seqlen", "64", "--int8-kernel",
                     "--baseline", "--save", tmp_path / "ck", "--json", tmp_path / "sq.json")
    li8 = pool.submit(_run, "--method", "llm_int8", "--plant-outliers", "4", "--json", tmp_path / "li8.json")
    r = sq.result()
    assert r.returncode == 0, r.stderr
    reload = pool.submit(_run, "--load", tmp_path / "ck", "--json", tmp_path / "load.json")
    r2, r3, r4, r5 = reload.result(), li8.result(), zq.result(), aw.result()
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
  assert out3["config"]["activations"].startswith("LLM.int8 decomposition") and "8-bit" in out3["config"]["activations"]
  assert 8.0 < out3["size"]["bits_per_weight"] < 8.6
  assert r4.returncode == 0, r4.stderr
  out4 = json.loads((tmp_path / "zq.json").read_text())
  w4 = ("cpu kernel (native, M <= 16; more rows: emulated)" if qmatmul_cpu.available()
        else "emulated (dequantize + matmul)")
  assert out4["config"]["matmul_path"] == (f"{w4} on fake-quantized activations, "
                                           "int8 (int8 x int8 -> int32 dot_general)")  # W4 MLP, W8 attention
  assert all(l["linear_losses"]["mse_after"] < l["linear_losses"]["mse_before"] for l in out4["calibration"]["layers"])
  assert "zeroquant W4/8A8 ppl" in r4.stdout and "mse_after" in r4.stdout
  assert r5.returncode == 0, r5.stderr
  out5 = json.loads((tmp_path / "awq.json").read_text())
  assert "alpha/input_layernorm" in out5["calibration"]["layers"][0]["linear_losses"]
  assert 4.5 < out5["size"]["bits_per_weight"] < 5.2
