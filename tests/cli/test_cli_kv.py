"""``python -m qjax.quantize`` / ``qjax.generate`` with a quantized KV cache on stories260K: perplexity under the
quantized past, cache bytes in the summary, KVQuant calibration saved with the checkpoint and reused by --load."""
import concurrent.futures
import json
import os
import subprocess
import sys

COMMON = ["--seqlen", "64", "--eval-nsamples", "8", "--no-progress"]


def _run(module, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env, capture_output=True, text=True,
                        timeout=600)


def test_kv_quantized_ppl_save_load_and_generate(tmp_path):
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    kivi = pool.submit(_run, "qjax.quantize", *COMMON, "--kv-method", "kivi", "--kv-bits", "2", "--kv-group-size", "8",
                       "--kv-residual", "0", "--baseline", "--json", tmp_path / "kivi.json")
    kvq = pool.submit(_run, "qjax.quantize", *COMMON, "--kv-method", "kvquant", "--kv-bits", "3",
                      "--kv-calib-nsamples", "2", "--save", tmp_path / "ck", "--json", tmp_path / "kvq.json")
    gen = pool.submit(_run, "qjax.generate", "--prompt", "Once upon a time", "--max-new-tokens", "12",
                      "--kv-method", "kivi", "--kv-bits", "4", "--kv-group-size", "8", "--kv-residual", "8")
    r1, r2, r4 = kivi.result(), kvq.result(), gen.result()
    assert r2.returncode == 0, r2.stderr
    r3 = pool.submit(_run, "qjax.quantize", "--load", tmp_path / "ck", *COMMON, "--kv-method", "kvquant",
                     "--json", tmp_path / "load.json")
    # --load without --kv-method reuses the saved cache; asking for other bits is refused; none is dense.
    reuse = pool.submit(_run, "qjax.quantize", "--load", tmp_path / "ck", *COMMON, "--json", tmp_path / "reuse.json")
    other = _run("qjax.quantize", "--load", tmp_path / "ck", *COMMON, "--kv-method", "kvquant", "--kv-bits", "4",
                 "--json", tmp_path / "other.json")
    dense = _run("qjax.quantize", "--load", tmp_path / "ck", *COMMON, "--kv-method", "none",
                 "--json", tmp_path / "dense.json")
    gen_load = _run("qjax.generate", "--load", tmp_path / "ck", "--prompt", "Once upon a time", "--max-new-tokens", "4")
    r3, reuse = r3.result(), reuse.result()
  assert r1.returncode == 0, r1.stderr
  out = json.loads((tmp_path / "kivi.json").read_text())
  kv = out["kv_cache"]
  assert kv["name"] == "kivi-2" and kv["bytes_per_token"] < kv["dense_bytes_per_token"] / 3
  assert out["ppl"]["tinystories"] > out["ppl_baseline"]["tinystories"]   # the past really is quantized
  assert "KV cache bytes / token" in r1.stdout and "kivi-2" in r1.stdout
  saved = json.loads((tmp_path / "kvq.json").read_text())
  assert saved["kv_cache"]["name"] == "kvquant-3"
  assert (tmp_path / "ck" / "kv_calibration.npz").is_file()
  assert r3.returncode == 0, r3.stderr
  loaded = json.loads((tmp_path / "load.json").read_text())
  assert loaded["ppl"] == saved["ppl"]       # the saved calibration is reused, not refitted
  assert saved["timing"]["quantize_seconds"] > 0.05   # KVQuant's calibration counts as quantization time
  assert reuse.returncode == 0, reuse.stderr
  reused = json.loads((tmp_path / "reuse.json").read_text())
  assert reused["kv_cache"]["name"] == "kvquant-3" and reused["ppl"] == saved["ppl"]
  err = other.stderr.strip()
  assert other.returncode == 2 and len(err.splitlines()) == 1 and "kvquant-3" in err and "bits 3 -> 4" in err, err
  assert not (tmp_path / "other.json").exists()
  assert dense.returncode == 0, dense.stderr
  dense_out = json.loads((tmp_path / "dense.json").read_text())
  assert "kv_cache" not in dense_out and dense_out["ppl"] != saved["ppl"]
  assert gen_load.returncode == 0 and "KV cache kvquant-3" in gen_load.stderr, gen_load.stderr  # both CLIs reuse it
  assert r4.returncode == 0, r4.stderr
  assert r4.stdout.strip() and "kivi-4" in r4.stderr and "bytes/token" in r4.stderr
  from qjax.kernels.kivi_attention import cpu
  kivi_path, dense_path = (("cpu kernel (native, packed codes", "cpu kernel (native, t <= 16") if cpu.available() else
                            ("xla (store dequantized whole)", "xla (keys and values read back dense)"))
  assert f"; attention {kivi_path}" in r4.stderr, r4.stderr
  assert f"; attention {dense_path}" in gen_load.stderr, gen_load.stderr       # KVQuant: its dense view
