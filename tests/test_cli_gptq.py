"""``python -m qjax.quantize --method gptq`` end to end on stories260K: calibration report, save and reload."""
import json
import os
import subprocess
import sys


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
  return subprocess.run([sys.executable, "-m", "qjax.quantize", "--no-progress", *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=600)


def test_gptq_cli_round_trip(tmp_path):
  common = ["--seqlen", "64", "--eval-nsamples", "8"]
  r = _run("--method", "gptq", "--wbits", "3", "--groupsize", "32", "--act-order", "--static-groups",
           "--nsamples", "16", "--calib-seqlen", "64", "--baseline", *common,
           "--save", tmp_path / "ck", "--export-gptq", tmp_path / "hf", "--json", tmp_path / "q.json")
  assert r.returncode == 0, r.stderr
  out = json.loads((tmp_path / "q.json").read_text())
  cal = out["calibration"]
  assert cal["nsamples"] == 16 and cal["seqlen"] == 64 and len(cal["layers"]) == 5
  assert all(0 < l["output_rel_error"] < 1 and set(l["linear_losses"]) == {
      "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
      "mlp/up_proj", "mlp/down_proj"} for l in cal["layers"])
  assert cal["peak_host_bytes"] > cal["activation_bytes"] > 0
  assert out["config"]["method"]["config"]["act_order"] is True
  q, fp = out["ppl"]["tinystories"], out["ppl_baseline"]["tinystories"]
  assert fp < q < 3 * fp
  assert "rel. output error" in r.stdout and "peak host memory" in r.stdout
  r2 = _run("--load", tmp_path / "ck", *common, "--json", tmp_path / "l.json")
  assert r2.returncode == 0, r2.stderr
  assert json.loads((tmp_path / "l.json").read_text())["ppl"] == out["ppl"]
  # HF GPTQ export: attention linears (64 wide) exported, the 172-wide FFN kept dense and listed; re-import
  exp = out["export_gptq"]
  assert len(exp["quantized"]) == 20 and len(exp["excluded"]) == 15 and "kept dense" in r.stdout
  hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
  assert hf_cfg["quant_method"] == "gptq" and hf_cfg["bits"] == 3 and hf_cfg["desc_act"] is True
  r3 = _run("--model", tmp_path / "hf", *common, "--json", tmp_path / "hf.json")
  assert r3.returncode == 0, r3.stderr
  reimported = json.loads((tmp_path / "hf.json").read_text())["ppl"]["tinystories"]
  assert abs(reimported / q - 1) < 1e-5
