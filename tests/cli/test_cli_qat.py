"""``python -m qjax.quantize --method peqa`` end to end on stories260K: the training table and JSON, the loss log
and its PNG, and a second run on the same checkpoint folder resuming instead of training again."""
import concurrent.futures
import json
import os
import subprocess
import sys

SMALL = ["--nsamples", "8", "--calib-seqlen", "64", "--seqlen", "64", "--eval-nsamples", "4", "--no-progress",
         "--train-warmup", "1", "--train-batch-size", "2"]
PEQA = ["--method", "peqa", "--wbits", "3", "--groupsize", "32", "--train-steps", "6", "--train-lr", "1e-3"]


def _run(*args, common=(*SMALL, *PEQA)):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
  return subprocess.run([sys.executable, "-m", "qjax.quantize", *common, *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=600)


def test_peqa_trains_logs_and_resumes(tmp_path):
  extra = ["--train-log", tmp_path / "log.jsonl", "--checkpoint-dir", tmp_path / "ckpt", "--checkpoint-every", "3"]
  r = _run(*extra, "--json", tmp_path / "a.json")
  assert r.returncode == 0, r.stderr
  out = json.loads((tmp_path / "a.json").read_text())
  t = out["training"]
  assert len(t["losses"]) == 6 and t["resumed_from"] == 0 and t["memory"]["total"] > 0
  assert "first loss" in r.stdout and "peqa W3 ppl" in r.stdout
  assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 6
  assert (tmp_path / "log.png").read_bytes()[:4] == b"\x89PNG"
  r2 = _run(*extra, "--json", tmp_path / "b.json")
  assert r2.returncode == 0, r2.stderr
  again = json.loads((tmp_path / "b.json").read_text())
  assert again["training"]["resumed_from"] == 6 and again["training"]["losses"] == t["losses"]
  assert again["ppl"] == out["ppl"]
  assert "resumed from step 6" in r2.stdout


def test_bad_training_flags_are_one_line_errors(tmp_path):
  r = _run("--train-steps", "0", "--json", tmp_path / "x.json")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and "steps must be a positive integer" in r.stderr
  assert "--train-steps 0" in r.stderr
  assert not (tmp_path / "x.json").exists()


def _run_method(*args):
  return _run("--train-steps", "4", *args, common=SMALL)


def test_llm_qat_on_generated_text_and_qlora_with_its_adapters(tmp_path):
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    qat = pool.submit(_run_method, "--method", "llm_qat", "--wbits", "4", "--abits", "8", "--qat-kv-bits", "4",
                      "--calib-dataset", "generated", "--save", tmp_path / "ck", "--export-gptq", tmp_path / "gptq",
                      "--json", tmp_path / "qat.json")
    ql = pool.submit(_run_method, "--method", "qlora", "--lora-rank", "4", "--save-adapters", tmp_path / "ad",
                     "--json", tmp_path / "ql.json")
    r1 = qat.result()
    assert r1.returncode == 0, r1.stderr
    back = pool.submit(_run, "--load", tmp_path / "ck", "--seqlen", "64", "--eval-nsamples", "4", "--no-progress",
                       "--json", tmp_path / "back.json", common=())
    r2, r3 = ql.result(), back.result()
  assert r3.returncode == 0, r3.stderr
  loaded = json.loads((tmp_path / "back.json").read_text())
  out = json.loads((tmp_path / "qat.json").read_text())
  assert out["config"]["activations"] == "8-bit per-token sym, dynamic; KV cache 4-bit per token sym"
  assert out["training"]["nsamples"] == 8 and "llm_qat W4A8KV4 ppl" in r1.stdout
  assert loaded["config"]["activations"] == out["config"]["activations"]          # A8 and KV4 travel with it
  assert abs(loaded["ppl"]["tinystories"] / out["ppl"]["tinystories"] - 1) < 1e-6
  assert (tmp_path / "gptq" / "config.json").is_file()
  assert r2.returncode == 0, r2.stderr
  out2 = json.loads((tmp_path / "ql.json").read_text())
  assert out2["adapters"]["adapters"] == 35 and (tmp_path / "ad" / "adapter_config.json").is_file()
  m = out2["finetune_memory"]
  assert m["qlora"]["total"] < m["16-bit"]["total"] and "fine-tuning memory" in r2.stdout
  bad = _run("--method", "rtn", "--save-adapters", tmp_path / "x", common=())
  assert bad.returncode == 2 and "needs --method qlora" in bad.stderr and not (tmp_path / "x").exists()
