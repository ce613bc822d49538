"""Decode throughput benchmark: qjax generation (``qjax.evaluation.generation``) versus transformers' ``generate`` on this CPU.

For each model, cache length L and KV-cache method, both frameworks prefill the same prompt of ``L - N`` tokens
(the start of the TinyStories eval text, stories260K tokenizer) and greedily decode ``N`` tokens without
stopping early (qjax ``stop_tokens=()``, torch ``min_new_tokens=N``), so the cache holds L tokens at the end.
Decode throughput is ``(N - 1) / decode time``: the first new token comes from the prefill, the N - 1 others
from decode steps. qjax: ``GenerationResult.decode_tokens_per_second`` (one compiled ``lax.while_loop``,
compilation excluded). torch: ``AutoModelForCausalLM`` float32, ``sdpa`` attention, default (dynamic) cache,
``torch.inference_mode()``, one untimed warm-up; a stopping criterion that never stops timestamps each new token:
prefill = until the first token, decode time = first to last token. The frameworks alternate
for ``--repeats`` rounds and the best round of each is reported (the CPU is shared and noisy: compare the ratio of
one run, not numbers across runs). ``cache_bytes_per_token``: K+V bytes per cached token over all layers
(``qjax.evaluation.generation.cache_bytes_per_token``); torch's fp32 cache holds the same.

Models: ``stories260K`` (context 512: L = 2048 is skipped) and ``llama8x512`` (``eval/bench_ppl.py``: 8 layers,
hidden 512, random weights, context 2048). KV methods (``--kv-methods``): ``fp`` (dense cache in the compute
dtype), ``kivi-B`` (group ``min(32, head_dim)`` = 8 for stories260K, residual 4 groups) and ``kvquant-B``
(calibrated on 4 windows of the TinyStories calib text, 1% outliers, first token exact); transformers runs the fp
model once per length and every qjax method is compared with it (``ratio_vs_torch``) and with qjax fp.
Threads: ``--threads N`` as in ``eval/bench_ppl.py``
(torch threads and the process's CPU affinity, before JAX starts; ``OMP_WAIT_POLICY`` defaults to PASSIVE).

Run: ``OMP_NUM_THREADS=1 JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 python eval/bench_decode.py`` (a few minutes), or
quickly: ``... eval/bench_decode.py --models stories260K --lengths 512 --new-tokens 16 --repeats 1``.
Prints one JSON object to stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see eval/bench_ppl.py

from bench_ppl import (environment, log, model_source, pin_threads,  # noqa: E402  (eval/ is the script's folder)
                       torch_causal_lm)

MODELS = ("stories260K", "llama8x512", "smollm2-135m")
KV_METHODS = ("fp", "kivi-2", "kivi-4", "kvquant-2", "kvquant-3", "kvquant-4")


def kv_setup(method: str, model, params, tok):
  """``(cache factory, effective bits)`` of a ``--kv-methods`` entry (KIVI: groups of min(32, head_dim), residual
  4 groups; KVQuant: 4 calibration windows of the TinyStories calib text), built by ``qjax.api``."""
  from qjax import api
  from qjax.calibration import calibration_windows
  from qjax.io import assets
  from qjax.io import text as data
  from qjax.methods.kv import kivi, kvquant
  from qjax.models.kv_cache import KVCache
  if method == "fp":
    return KVCache.dense, 32.0
  name, _, bits = method.partition("-")
  g = min(32, model.config.head_dim)
  windows = None
  if name == "kivi":
    cfg = kivi.KIVIConfig(bits=int(bits), group_size=g, residual=4 * g)
  else:
    cfg = kvquant.KVQuantConfig(bits=int(bits), nsamples=4)
    tokens = data.tokenize(tok, data.read_text(assets.named_text("tinystories", assets.CALIB_DATASETS)))
    windows = calibration_windows(model, tokens, cfg.nsamples, cfg.seqlen, seed=0)
  kv = api.quantize_model(model, params, api.Recipe(kv=cfg), kv_calibration=windows).kv
  return kv.cache_factory, kv.effective_bits


def torch_decode(model, prompt, new_tokens: int) -> tuple[list[int], float, float]:
  """``(new token ids, prefill + first token seconds, decode tokens per second)`` of one greedy ``generate``;
  a stopping criterion that never stops timestamps every new token."""
  import torch
  from transformers import StoppingCriteria, StoppingCriteriaList

  class Clock(StoppingCriteria):
    def __init__(self):
      self.times = []

    def __call__(self, input_ids, scores, **kwargs):
      self.times.append(time.perf_counter())
      return torch.zeros(input_ids.shape[0], dtype=torch.bool)

  ids = torch.tensor([prompt])
  clock = Clock()
  with torch.inference_mode():
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
  t = clock.times
  assert len(t) == new_tokens
  return out[0, len(prompt):].tolist(), t[0] - start, (new_tokens - 1) / (t[-1] - t[0])


def bench(name, path, tok, tokens, length, new_tokens, methods, repeats):
  """One model and cache length; ``tok`` (the model's tokenizer) tokenizes KVQuant's
  calibration text."""
  from qjax.evaluation import generation
  from qjax.io.hf import load_model
  model, params = load_model(path)
  context = model.config.max_position_embeddings
  if length > context:
    log(f"[{name}] L={length}: skipped (context {context})")
    return {"skipped": f"cache length {length} exceeds the model context {context}"}
  prompt = tokens[:length - new_tokens].tolist()
  tm = torch_causal_lm(path)
  torch_decode(tm, prompt[:16], 4)  # warm-up
  gens = {}
  for m in methods:
    factory, bits = kv_setup(m, model, params, tok)
    gens[m] = (generation.Generator(model, params, cache_factory=factory), bits)
  q, t = {m: [] for m in methods}, []
  for i in range(repeats):
    ttok, tprefill, ttps = torch_decode(tm, prompt, new_tokens)
    t.append((tprefill, ttps))
    log(f"[{name}] L={length} round {i}: torch fp {ttps:8.1f} tok/s (prefill {tprefill:.3f} s)")
    for m in methods:
      r = gens[m][0].generate([prompt], new_tokens, max_len=length, stop_tokens=())
      q[m].append(r)
      log(f"[{name}] L={length} round {i}: qjax {m:10s} {r.decode_tokens_per_second:8.1f} tok/s "
          f"(prefill {r.prefill_seconds:.3f} s)")
  ttps = max(x[1] for x in t)
  out = {"torch_fp_decode_tokens_per_second": round(ttps, 1),
         "torch_prefill_seconds": round(min(x[0] for x in t), 4), "rounds_torch": [round(x[1]) for x in t],
         "prompt_tokens": len(prompt), "new_tokens": new_tokens}
  fp_tps = max(r.decode_tokens_per_second for r in q["fp"]) if "fp" in q else None
  for m in methods:
    rs, r = q[m], q[m][-1]
    qtps = max(x.decode_tokens_per_second for x in rs)
    same = next((i for i, (a, b) in enumerate(zip(r.tokens[0], ttok)) if a != b), new_tokens)
    out[m] = {"qjax_decode_tokens_per_second": round(qtps, 1), "ratio_vs_torch": round(qtps / ttps, 3),
              "ratio_vs_qjax_fp": round(qtps / fp_tps, 3) if fp_tps else None,
              "qjax_prefill_seconds": round(min(x.prefill_seconds for x in rs), 4),
              "qjax_compile_seconds": round(gens[m][0].compile_seconds, 2),
              "cache_bytes_per_token": r.cache_bytes_per_token, "effective_bits": gens[m][1],
              "greedy_tokens_agree_with_torch": same, "rounds_qjax": [round(x.decode_tokens_per_second) for x in rs]}
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
  p.add_argument("--lengths", default="512,2048", help="cache lengths L (prompt L - N, then N new tokens)")
  p.add_argument("--new-tokens", type=int, default=64, help="N: tokens decoded per run (default 64)")
  p.add_argument("--kv-methods", default=",".join(KV_METHODS),
                 help=f"comma-separated subset of {','.join(KV_METHODS)}")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both frameworks (default: all)")
  p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each is reported")
  args = p.parse_args(argv)
  names = [m for m in args.models.split(",") if m]
  methods = [m for m in args.kv_methods.split(",") if m]
  lengths = [int(x) for x in args.lengths.split(",") if x]
  if unknown := (set(names) - set(MODELS)) | (set(methods) - set(KV_METHODS)):
    p.error(f"unknown model(s) or KV method(s) {sorted(unknown)}; known: {MODELS}, {KV_METHODS}")
  if args.new_tokens < 2 or any(n <= args.new_tokens for n in lengths):
    p.error("need --new-tokens >= 2 and every length > --new-tokens")
  pin_threads(args.threads)

  import torch
  import transformers

  from qjax.io import assets
  from qjax.io import text as data
  transformers.utils.logging.disable_progress_bar()
  transformers.utils.logging.set_verbosity_error()
  torch.set_num_threads(args.threads)
  text = data.read_text(assets.named_text("tinystories", assets.PPL_DATASETS))
  out = {"env": environment(repeats=args.repeats, new_tokens=args.new_tokens), "models": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      path, tok_dir = model_source(name, tmp)
      tok = data.load_tokenizer(tok_dir)
      tokens = data.tokenize(tok, text[:200_000])
      out["models"][name] = {f"L{n}": bench(name, path, tok, tokens, n, args.new_tokens, methods, args.repeats)
                             for n in lengths}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  sys.exit(main())
