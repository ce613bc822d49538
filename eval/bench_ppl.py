"""Perplexity throughput benchmark: qjax (JAX/XLA) versus transformers + torch, on this CPU.

For each model both frameworks score the SAME non-overlapping windows (``qjax.perplexity.windows``) with the
same batch size and the same NLL (per window: mean NLL of positions 1..T-1; ppl = exp of the mean over windows),
and we report scored tokens per second (windows * seqlen / wall time) with compilation / one warm-up batch
excluded, plus both perplexities as a correctness check.

Models:
  stories260K  the real checkpoint at ``$QJAX_ASSETS/models/stories260K``, TinyStories eval text, seqlen 256.
  llama8x512   an 8-layer LLaMA, hidden 512, MLP 1376, 8 heads, vocab 512 (reuses the stories260K tokenizer and
               token ids), random weights (``torch.manual_seed(0)``) saved with ``save_pretrained`` to a temp dir
               and loaded by both frameworks; seqlen 512.

qjax side: ``qjax.perplexity.perplexity`` (jit, compile excluded). torch side: ``AutoModelForCausalLM`` in
float32 under ``torch.inference_mode()``, ``torch.set_num_threads(--threads)`` (default ``os.cpu_count()``: XLA's
CPU thread pool also uses every core, while torch would follow ``OMP_NUM_THREADS``, which ``make bench`` sets to 1).

Run: ``make bench`` (= ``OMP_NUM_THREADS=1 .venv/bin/python eval/bench_ppl.py``), or e.g.
  JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 python eval/bench_ppl.py --models llama8x512 --nsamples 32 --batch-size 8
Prints one JSON object to stdout; progress goes to stderr. Timings on a shared CPU are noisy (~2x run to run):
compare the ratio measured within one run.
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

MODELS = {  # name -> (default seqlen, default nsamples: ~10-30 s per framework on a 2-core CPU)
    "stories260K": (256, 512),
    "llama8x512": (512, 64),
}


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def make_llama8x512(path):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=512, max_position_embeddings=2048, bos_token_id=1,
                    eos_token_id=2, tie_word_embeddings=False)
  torch.manual_seed(0)
  LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)


def torch_ppl(model, w, batch_size):
  """``(ppl, tokens_per_second)`` over windows ``w [n, T]``, padded to full batches like qjax; the first batch
  is run once untimed as warm-up."""
  import torch
  n, t = w.shape
  nb = -(-n // batch_size)
  padded = np.concatenate([w, np.repeat(w[:1], nb * batch_size - n, axis=0)]).reshape(nb, batch_size, t)

  def step(ids):
    ids = torch.from_numpy(ids.astype(np.int64))
    logits = model(ids[:, :-1]).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, ids[:, 1:, None])[..., 0].mean(-1)

  with torch.inference_mode():
    step(padded[0])
    start = time.perf_counter()
    nll = torch.cat([step(b) for b in padded]).numpy()[:n]
    elapsed = time.perf_counter() - start
  return float(np.exp(np.mean(nll.astype(np.float64)))), n * t / elapsed


def bench(name, path, tokens, seqlen, nsamples, batch_size, threads, attn):
  import torch
  from transformers import AutoModelForCausalLM
  from qjax import models, perplexity
  w = perplexity.windows(tokens, seqlen, nsamples)
  model, params = models.load(path)
  bs = min(batch_size or perplexity.default_batch_size(seqlen, model.config.vocab_size), len(w))
  log(f"[{name}] {len(w)} windows x {seqlen} tokens, batch {bs}: qjax ...")
  r = perplexity.perplexity(model, params, tokens, seqlen, len(w), bs, progress=False)
  log(f"[{name}] qjax  {r.tokens_per_second:10.0f} tok/s  ppl {r.ppl:.4f}; torch ({attn}) ...")
  tm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
  tppl, ttps = torch_ppl(tm, w, bs)
  log(f"[{name}] torch {ttps:10.0f} tok/s  ppl {tppl:.4f}")
  return {"qjax_tokens_per_second": round(r.tokens_per_second, 1), "torch_tokens_per_second": round(ttps, 1),
          "ratio": round(r.tokens_per_second / ttps, 3), "qjax_ppl": r.ppl, "torch_ppl": tppl,
          "ppl_rel_diff": abs(r.ppl - tppl) / tppl, "windows": len(w), "seqlen": seqlen, "batch_size": bs,
          "threads": threads, "torch_attn_implementation": attn}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
  p.add_argument("--nsamples", type=int, help="windows per model (default: per-model, see MODELS)")
  p.add_argument("--batch-size", type=int, help="windows per batch (default: qjax.perplexity.default_batch_size)")
  p.add_argument("--seqlen", type=int, help="override every model's window length")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
  p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="torch attention implementation")
  args = p.parse_args(argv)
  names = [m for m in args.models.split(",") if m]
  if unknown := set(names) - set(MODELS):
    p.error(f"unknown model(s) {sorted(unknown)}; known: {','.join(MODELS)}")

  import jax
  import torch
  import transformers
  from qjax import assets, data
  torch.set_num_threads(args.threads)
  story = assets.asset(assets.DEFAULT_MODEL)
  tokens = data.tokenize(data.load_tokenizer(story), data.read_text(assets.named_text("tinystories",
                                                                                        assets.PPL_DATASETS)))
  log(f"TinyStories eval: {len(tokens)} tokens; torch threads {torch.get_num_threads()}, "
      f"jax devices {jax.devices()}")
  out = {"env": {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "python": platform.python_version(), "cpu_count": os.cpu_count(),
                 "affinity": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                 "jax_backend": jax.default_backend()},
         "models": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      seqlen, nsamples = MODELS[name]
      path = story
      if name == "llama8x512":
        path = os.path.join(tmp, name)
        make_llama8x512(path)
      out["models"][name] = bench(name, path, tokens, args.seqlen or seqlen, args.nsamples or nsamples,
                                  args.batch_size, args.threads, args.attn)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
