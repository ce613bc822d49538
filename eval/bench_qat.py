"""Quantization-aware training on a real model: each QAT method's quality against its post-training starting
point, its training throughput and its peak host memory, with a torch training step as the speed peer.

Runs (``--only``, comma-separated; default all), each in its own process so its peak RSS is its own:

* ``llm_qat_w4a8``, ``llm_qat_w4a8kv4``: LLM-QAT, W4 per channel symmetric, A8 per token symmetric (and the KV
  cache 4-bit per token), trained data-free on ``--gen-windows`` windows the float model generates (3 greedy
  tokens, then sampled). Start: RTN with the same quantizers. Reported: fp, RTN and LLM-QAT perplexity on the
  evaluation text and the share of RTN's increase recovered, ``(rtn - qat) / (rtn - fp)``.
* ``peqa_w4_g64``, ``l4q_w4_g64``: PEQA (scales only) and L4Q (LoRA + LSQ steps, rank 8), W4 groups of 64
  asymmetric, trained on the calibration text; perplexity on that text (its first windows), start: RTN W4 g64.
* ``qlora_r16``: QLoRA (NF4 double-quantized base, rank 16, bfloat16 compute) fine-tuned on the TinyStories
  calibration text; perplexity on the TinyStories eval text against the NF4 base (also bfloat16), plus the
  16-bit vs QLoRA memory table.
* ``torch_step``: the peer: transformers + torch float32, one full fine-tuning step (next-token cross-entropy,
  AdamW over every parameter) on the same window shape, tokens/s (median of ``--torch-steps``).

Models: ``--model stories`` (stories260K; TinyStories texts) or ``smollm2`` (SmolLM2-135M-Instruct GGUF;
LLM-QAT, PEQA and L4Q on WikiText-2: evaluation on its test text, training text its validation text).

  JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 .venv/bin/python eval/bench_qat.py --model smollm2 --out qat.json
Prints one JSON object to stdout (``--out``: also to a file); progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see eval/bench_ppl.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ppl import environment, log, torch_causal_lm  # noqa: E402

RUNS = ("llm_qat_w4a8", "llm_qat_w4a8kv4", "peqa_w4_g64", "l4q_w4_g64", "qlora_r16", "torch_step")
MODELS = {  # name -> (qjax model spec, text of LLM-QAT / PEQA / L4Q, evaluation seqlen)
    "stories": ("stories260k", "tinystories", 256),
    "smollm2": ("smollm2-135m", "wikitext2", 512),
}


def _setup(args):
  import qjax
  from qjax.io import assets
  from qjax.io import text as data
  spec, text_name, seqlen = MODELS[args.model]
  loaded = qjax.load(spec)
  tokens = lambda name, table: data.tokenize(loaded.tokenizer, data.read_text(assets.named_text(name, table)))
  return loaded, text_name, seqlen, tokens


def _train(args, **kw):
  from qjax.methods.qat.config import TrainConfig
  return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=kw.get("lr", args.lr), warmup=args.warmup,
                     seed=args.seed)


def _report(report, windows) -> dict:
  d = report.to_dict()
  return {"windows": list(windows.shape), "steps": len(d["losses"]), "first_loss": d["losses"][0],
          "last_loss": d["losses"][-1], "tokens": d["tokens"], "seconds": d["seconds"],
          "compile_seconds": d["compile_seconds"], "tokens_per_second": d["tokens_per_second"],
          "memory_estimate_bytes": d["memory"]["total"]}


def run_one(name: str, args) -> dict:
  """One run in this process (see the module docstring)."""
  if name == "torch_step":
    return torch_step(args)
  from qjax.calibration import Calibration, calibration_windows
  from qjax.core import tree
  from qjax.evaluation import data_free, perplexity
  from qjax.io import assets
  from qjax.methods.qat import l4q, llm_qat, peqa, qlora
  from qjax.methods.weights import rtn

  loaded, text_name, seqlen, tokens = _setup(args)
  model, params = loaded.model, loaded.params
  ppl = lambda m, p, text: perplexity.perplexity(m, p, text, seqlen, args.eval_windows, progress=False).ppl
  out = {"name": name, "model": args.model}
  t0 = time.perf_counter()
  if name.startswith("llm_qat"):
    kv = 4 if name.endswith("kv4") else 16
    cfg = llm_qat.LLMQATConfig(bits=4, abits=8, kv_bits=kv, train=_train(args))
    g0 = time.perf_counter()
    windows = data_free.generated_windows(model, params, args.gen_windows, args.train_seqlen, seed=args.seed)
    out["generate_seconds"] = time.perf_counter() - g0
    q, report = llm_qat.quantize(params, cfg, model=model, calibration=Calibration(model, windows))
    ev = tokens(text_name, assets.PPL_DATASETS)
    act = model.with_hooks(cfg.act_config().hooks())
    start = rtn.quantize(params, rtn.RTNConfig(bits=4, sym=True), progress=False)[0]
    fp, base, trained = ppl(model, params, ev), ppl(act, start, ev), ppl(act, q, ev)
    out["ppl"] = {"fp": fp, "rtn": base, "trained": trained, "text": f"{text_name} eval"}
    out["recovered"] = (base - trained) / (base - fp)
  elif name.startswith(("peqa", "l4q")):
    text = tokens(text_name, assets.CALIB_DATASETS)
    calib = calibration_windows(model, text, args.windows, args.train_seqlen, args.seed)
    if name.startswith("peqa"):
      q, report = peqa.quantize(params, peqa.PEQAConfig(bits=4, group_size=64, train=_train(args)), model=model,
                                calibration=calib)
    else:
      q, report = l4q.quantize(params, l4q.L4QConfig(bits=4, group_size=64, rank=8, train=_train(args)),
                               model=model, calibration=calib)
    windows = calib.windows
    start = rtn.quantize(params, rtn.RTNConfig(bits=4, group_size=64), progress=False)[0]
    out["ppl"] = {"fp": ppl(model, params, text), "rtn": ppl(model, start, text), "trained": ppl(model, q, text),
                  "text": f"{text_name} calibration text (the training text)"}
  elif name.startswith("qlora"):
    calib = calibration_windows(model, tokens("tinystories", assets.CALIB_DATASETS), args.windows, args.train_seqlen,
                                args.seed)
    cfg = qlora.QLoRAConfig(rank=16, train=_train(args, lr=args.qlora_lr))
    q, report = qlora.quantize(params, cfg, model=model, calibration=calib)
    windows = calib.windows
    ev = tokens("tinystories", assets.PPL_DATASETS)
    base = tree.replace(params, tree.matching(params, cfg.targets), lambda _, w: qlora.quantize_base(w, cfg))
    out["ppl"] = {"fp": ppl(model, params, ev), "nf4_base": ppl(model, base, ev), "trained": ppl(model, q, ev),
                  "text": "tinystories eval (float32 compute; training ran in bfloat16)"}
    out["memory_table"] = qlora.memory_table(params, q)
  else:
    raise SystemExit(f"unknown run {name!r} (known: {', '.join(RUNS)})")
  out["train"] = _report(report, windows)
  out["wall_seconds"] = time.perf_counter() - t0
  out["peak_host_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return out


def torch_step(args) -> dict:
  """transformers + torch float32 full fine-tuning steps (forward, backward, AdamW over every parameter) on
  ``batch x seqlen`` windows of random tokens: the median step's tokens/s (the first step excluded)."""
  import numpy as np
  import torch

  from qjax.io import assets
  model = torch_causal_lm(assets.model_path(MODELS[args.model][0])).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
  ids = torch.as_tensor(np.random.default_rng(0).integers(0, model.config.vocab_size,
                                                          (args.batch_size, args.train_seqlen)))
  times = []
  for _ in range(args.torch_steps):
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t0)
  step = float(np.median(times[1:] if len(times) > 1 else times))
  return {"name": "torch_step", "model": args.model, "torch": torch.__version__, "threads": torch.get_num_threads(),
          "batch": args.batch_size, "seqlen": args.train_seqlen, "step_seconds": step,
          "tokens_per_second": args.batch_size * args.train_seqlen / step,
          "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=tuple(MODELS), default="stories")
  p.add_argument("--only", help=f"comma-separated runs (default all: {', '.join(RUNS)})")
  p.add_argument("--steps", type=int, default=100, help="optimizer steps per method (default 100)")
  p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
  p.add_argument("--train-seqlen", type=int, default=128, help="tokens per training window (default 128)")
  p.add_argument("--windows", type=int, default=64, help="training windows of a text (default 64)")
  p.add_argument("--gen-windows", type=int, default=64, help="LLM-QAT's generated windows (default 64)")
  p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
  p.add_argument("--qlora-lr", type=float, default=1e-3, help="QLoRA's peak learning rate (default 1e-3)")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--eval-windows", type=int, default=20, help="perplexity windows (default 20)")
  p.add_argument("--torch-steps", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="also write the JSON here")
  p.add_argument("--worker", help=argparse.SUPPRESS)   # one run in this process
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(run_one(args.worker, args)))
    return
  names = args.only.split(",") if args.only else list(RUNS)
  results = {"model": args.model, "argv": sys.argv[1:], "environment": environment(), "runs": {}}
  for name in names:
    log(f"== {name}")
    cmd = [sys.executable, __file__, "--worker", name, *[a for a in sys.argv[1:] if a not in ("--out", args.out)]]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
      results["runs"][name] = {"error": f"exit {r.returncode}"}
      continue
    results["runs"][name] = json.loads(r.stdout.strip().splitlines()[-1])
    log(json.dumps(results["runs"][name]))
  text = json.dumps(results, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
