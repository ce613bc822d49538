"""Streaming GPTQ's host memory against depth, and a real kill-and-resume (the multi-device issue, streaming part).

For each depth (``--layers``, default 8 and 32) a random LLaMA of width ``--hidden`` (default 1024, FFN 2816, 16
heads; written by transformers as sharded safetensors, with stories260K's 512-token vocabulary and tokenizer) is
quantized by ``python -m qjax.quantize --stream`` (GPTQ W4 g128) in a child process, whose peak resident set
(``ru_maxrss`` from ``wait4``) is reported beside the model's size on disk and the checkpoint written. With
streaming the peak should not grow with depth (the acceptance: 8 vs 32 layers within 10%); an in-memory run
holds every layer. Then the shallowest model's run is started again, SIGKILLed once ``--kill-after`` layers are
recorded in its staging folder, resumed with ``--resume``, and its checkpoint compared array by array with the
uninterrupted run's. The models are written by a separate child, so this parent stays small: Linux keeps a
process's peak RSS across ``exec``, so a child forked from a parent that had held a model would report the
parent's peak as its own.

  python eval/stream_memory.py --json out/stream_memory.json
  python eval/stream_memory.py --layers 2,4 --hidden 256 --nsamples 4 --seqlen 64    # quick
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", default="8,32", help="comma-separated depths")
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--nsamples", type=int, default=16)
  p.add_argument("--seqlen", type=int, default=256)
  p.add_argument("--kill-after", type=int, default=3, help="layers finished before the SIGKILL")
  p.add_argument("--json", help="write the results here")
  p.add_argument("--make", nargs=3, metavar=("PATH", "LAYERS", "HIDDEN"), help=argparse.SUPPRESS)  # the writer child
  return p.parse_args(argv)


def make_model(path: Path, layers: int, hidden: int):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  from qjax.io import assets
  cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                    num_attention_heads=16, num_key_value_heads=16, vocab_size=512, max_position_embeddings=2048,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
  torch.manual_seed(0)
  LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path, max_shard_size="200MB")
  for f in assets.asset(assets.DEFAULT_MODEL).iterdir():      # the stories260K tokenizer (same vocabulary)
    if f.name.startswith(("tokenizer", "special_tokens")):
      shutil.copy2(f, path)


def command(args, model: Path, out: Path, *extra) -> list[str]:
  return [sys.executable, "-m", "qjax.quantize", "--model", str(model), "--method", "gptq", "--wbits", "4",
          "--groupsize", "128", "--nsamples", str(args.nsamples), "--calib-seqlen", str(args.seqlen),
          "--calib-text", str(calib_text()), "--stream", "--save", str(out), "--no-progress", *extra]


def calib_text() -> Path:
  from qjax.io import assets
  return assets.asset(assets.CALIB_DATASETS["tinystories"])


def run_child(cmd) -> tuple[int, float, int]:
  """``(exit status, seconds, peak RSS bytes)`` of one child process."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  err = proc.stderr.read().decode()
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
  return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024


def du(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def same_checkpoint(a: Path, b: Path) -> dict:
  """Whether two checkpoints hold the same arrays (every field of every quantized tensor) and metadata."""
  import jax
  import numpy as np

  from qjax.io import checkpoint
  (pa, ma), (pb, mb) = checkpoint.load_params(a), checkpoint.load_params(b)
  la, lb = [np.asarray(x) for x in jax.tree.leaves(pa)], [np.asarray(x) for x in jax.tree.leaves(pb)]
  equal = (jax.tree.structure(pa) == jax.tree.structure(pb) and ma["qarrays"] == mb["qarrays"]
           and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb)))
  return {"arrays": len(la), "identical": bool(equal)}


def main(argv=None):
  args = parse_args(argv)
  if args.make:
    return make_model(Path(args.make[0]), int(args.make[1]), int(args.make[2]))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  depths = [int(x) for x in args.layers.split(",")]
  log = lambda *a: print(*a, file=sys.stderr, flush=True)
  out = {"hidden": args.hidden, "nsamples": args.nsamples, "seqlen": args.seqlen, "cores": os.cpu_count(),
         "load_average": os.getloadavg(), "runs": {}}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    for n in depths:
      model = tmp / f"llama{n}x{args.hidden}"
      subprocess.run([sys.executable, __file__, "--make", str(model), str(n), str(args.hidden)], check=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      _, seconds, rss = run_child(command(args, model, tmp / f"q{n}"))
      out["runs"][n] = {"layers": n, "model_bytes": du(model), "checkpoint_bytes": du(tmp / f"q{n}"),
                        "peak_rss_bytes": rss, "seconds": seconds}
      log(n, "layers", out["runs"][n])
    rss = [out["runs"][n]["peak_rss_bytes"] for n in depths]
    out["peak_rss_ratio_deepest_to_shallowest"] = rss[-1] / rss[0]
    n = depths[0]
    model, dest = tmp / f"llama{n}x{args.hidden}", tmp / "killed"
    state = tmp / ".killed.stream" / "stream.json"
    proc = subprocess.Popen(command(args, model, dest), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished = 0
    while proc.poll() is None:
      try:
        finished = len(json.loads(state.read_text())["layers"])
      except (OSError, ValueError):
        finished = 0
      if finished >= args.kill_after:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.05)
    proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    _, seconds, rss = run_child(command(args, model, dest, "--resume"))
    out["kill_resume"] = {"layers": n, "killed_after": finished, "killed": killed, "resume_seconds": seconds,
                          **same_checkpoint(tmp / f"q{n}", dest)}
    log("kill/resume", out["kill_resume"])
  print(json.dumps(out, indent=1))
  if args.json:
    from qjax.cli.common import write_json
    write_json(args.json, out)


if __name__ == "__main__":
  main()
