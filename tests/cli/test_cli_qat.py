"""``python -m qjax.quantize --method peqa`` end to end on stories260K: the training table and JSON, the loss log
and its PNG, and a second run on the same checkpoint folder resuming instead of training again."""
import json
import os
import subprocess
import sys

COMMON = ["--method", "peqa", "--wbits", "3", "--groupsize", "32", "--nsamples", "8", "--calib-seqlen", "64",
          "--seqlen", "64", "--eval-nsamples", "4", "--no-progress", "--train-steps", "6", "--train-warmup", "1",
          "--train-lr", "1e-3", "--train-batch-size", "2"]


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
  return subprocess.run([sys.executable, "-m", "qjax.quantize", *COMMON, *map(str, args)], env=env,
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
