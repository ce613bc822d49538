"""``python -m qjax.quantize --method gptq`` end to end on stories260K: calibration report, save and reload."""
import concurrent.futures
import json
import os
import subprocess
import sys


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
  return subprocess.run([sys.executable, "-m", "qjax.quantize", "--no-progress", *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=600)


def test_gptq_cli_round_trip(tmp_path):
  """GPTQ's CLI defaults (act-order + static groups with groups), save and reload, HF GPTQ export (dense
  tensors in fp16, every file with the same mode, one summary line) and its re-import (labelled as loaded)."""
  common = ["--seqlen", "64", "--eval-nsamples", "8"]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    natural = pool.submit(_run, "--method", "gptq", "--wbits", "3", "--groupsize", "32", "--no-act-order",
                          "--nsamples", "4", "--calib-seqlen", "32", "--eval", "none", "--json", tmp_path / "n.json")
    r = _run("--method", "gptq", "--wbits", "3", "--groupsize", "32",
             "--nsamples", "16", "--calib-seqlen", "64", "--layer-report", "--baseline", *common,
             "--save", tmp_path / "ck", "--export-gptq", tmp_path / "exports" / "hf", "--json", tmp_path / "q.json")
    rn = natural.result()
  assert r.returncode == 0, r.stderr
  assert rn.returncode == 0, rn.stderr
  natural_out = json.loads((tmp_path / "n.json").read_text())
  assert all(l["output_rel_error"] is None for l in natural_out["calibration"]["layers"])  # no --layer-report
  cfg_n = natural_out["config"]["method"]["config"]
  assert cfg_n["act_order"] is False and cfg_n["static_groups"] is False
  out = json.loads((tmp_path / "q.json").read_text())
  cal = out["calibration"]
  assert cal["nsamples"] == 16 and cal["seqlen"] == 64 and len(cal["layers"]) == 5
  assert all(0 < l["output_rel_error"] < 1 and set(l["linear_losses"]) == {
      "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
      "mlp/up_proj", "mlp/down_proj"} for l in cal["layers"])
  assert cal["peak_host_bytes"] > cal["activation_bytes"] > 0
  assert out["config"]["method"]["config"]["act_order"] is True        # the defaults
  assert out["config"]["method"]["config"]["static_groups"] is True
  q, fp = out["ppl"]["tinystories"], out["ppl_baseline"]["tinystories"]
  assert fp < q < 3 * fp
  assert "rel. output error" in r.stdout and "peak host memory" in r.stdout
  r2 = _run("--load", tmp_path / "ck", *common, "--json", tmp_path / "l.json")
  assert r2.returncode == 0, r2.stderr
  assert json.loads((tmp_path / "l.json").read_text())["ppl"] == out["ppl"]
  # HF GPTQ export: attention linears (64 wide) exported, the 172-wide FFN kept dense and listed; re-import
  exp = out["export_gptq"]
  assert len(exp["quantized"]) == 20 and len(exp["excluded"]) == 15
  line = next(l for l in r.stdout.splitlines() if l.startswith("HF GPTQ export:"))
  assert "20 of 35 linears quantized, 15 kept dense in float16" in line and "172" in line, line
  assert "group sizes that fit every input width" in line
  from safetensors import safe_open
  with safe_open(str(tmp_path / "exports" / "hf" / "model.safetensors"), framework="numpy") as fh:
    dtypes = {k: fh.get_tensor(k).dtype.name for k in fh.keys()}
  assert dtypes["model.layers.0.mlp.down_proj.weight"] == "float16"        # kept dense, written in fp16
  assert dtypes["model.embed_tokens.weight"] == "float16" and dtypes["model.norm.weight"] == "float16"
  assert dtypes["model.layers.0.self_attn.q_proj.qweight"] == "int32"
  modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "exports" / "hf").iterdir()}  # parent created
  assert len(set(modes.values())) == 1, modes
  hf_cfg = json.loads((tmp_path / "exports" / "hf" / "config.json").read_text())["quantization_config"]
  assert hf_cfg["quant_method"] == "gptq" and hf_cfg["bits"] == 3 and hf_cfg["desc_act"] is True
  r3 = _run("--model", tmp_path / "exports" / "hf", *common, "--json", tmp_path / "hf.json")
  assert r3.returncode == 0, r3.stderr
  hf_out = json.loads((tmp_path / "hf.json").read_text())
  reimported = hf_out["ppl"]["tinystories"]
  assert abs(reimported / q - 1) < 1e-3  # the dense FFN was written in fp16
  assert hf_out["timing"]["quantize_seconds"] is None and hf_out["config"]["loaded"] == "HF GPTQ checkpoint"
  assert "hf-gptq W3 (loaded) ppl" in r3.stdout and "loaded HF GPTQ checkpoint, quantized before" in r3.stdout
