"""Decode throughput benchmark: qjax generation (``qjax.generation``) versus transformers' ``generate`` on this CPU.

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
(``qjax.generation.cache_bytes_per_token``); torch's fp32 cache holds the same.

Models: ``stories260K`` (context 512: L = 2048 is skipped) and ``llama8x512`` (``eval/bench_ppl.py``: 8 layers,
hidden 512, random weights, context 2048). KV methods (``--kv-methods``): ``fp`` (dense cache in the compute
dtype); quantized caches join this table as they land. Threads: ``--threads N`` as in ``eval/bench_ppl.py``
(torch threads and the process's CPU affinity, before JAX starts; ``OMP_WAIT_POLICY`` defaults to PASSIVE).

Run: ``OMP_NUM_THREADS=1 JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 python eval/bench_decode.py`` (a few minutes), or
quickly: ``... eval/bench_decode.py --models stories260K --lengths 512 --new-tokens 16 --repeats 1``.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see eval/bench_ppl.py

from bench_ppl import log, make_llama8x512  # noqa: E402  (eval/ is the script's folder)

MODELS = ("stories260K", "llama8x512")
KV_METHODS = ("fp",)


def cache_factory(method: str):
  """The qjax cache factory of a ``--kv-methods`` entry."""
  from qjax.models.kv_cache import KVCache
  return {"fp": KVCache.dense}[method]


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


def bench(name, path, tokens, length, new_tokens, methods, repeats):
  import torch
  from transformers import AutoModelForCausalLM
  from qjax import generation, models
  model, params = models.load(path)
  context = model.config.max_position_embeddings
  if length > context:
    log(f"[{name}] L={length}: skipped (context {context})")
    return {"skipped": f"cache length {length} exceeds the model context {context}"}
  prompt = tokens[:length - new_tokens].tolist()
  tm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
  torch_decode(tm, prompt[:16], 4)  # warm-up
  out = {}
  for method in methods:
    gen = generation.Generator(model, params, cache_factory=cache_factory(method))
    q, t = [], []
    for i in range(repeats):
      r = gen.generate([prompt], new_tokens, max_len=length, stop_tokens=())
      ttok, tprefill, ttps = torch_decode(tm, prompt, new_tokens)
      q.append(r), t.append((tprefill, ttps))
      log(f"[{name}] L={length} {method} round {i}: qjax {r.decode_tokens_per_second:8.1f} tok/s "
          f"(prefill {r.prefill_seconds:.3f} s)  torch {ttps:8.1f} tok/s (prefill {tprefill:.3f} s)")
    qtps = max(r.decode_tokens_per_second for r in q)
    ttps = max(x[1] for x in t)
    same = next((i for i, (a, b) in enumerate(zip(r.tokens[0], ttok)) if a != b), new_tokens)
    out[method] = {
        "qjax_decode_tokens_per_second": round(qtps, 1), "torch_decode_tokens_per_second": round(ttps, 1),
        "ratio": round(qtps / ttps, 3),
        "qjax_prefill_seconds": round(min(r.prefill_seconds for r in q), 4),
        "torch_prefill_seconds": round(min(x[0] for x in t), 4),
        "qjax_compile_seconds": round(gen.compile_seconds, 2),
        "cache_bytes_per_token": r.cache_bytes_per_token, "prompt_tokens": len(prompt), "new_tokens": new_tokens,
        "greedy_tokens_agree": same, "rounds_qjax": [round(r.decode_tokens_per_second) for r in q],
        "rounds_torch": [round(x[1]) for x in t]}
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
  p.add_argument("--lengths", default="512,2048", help="cache lengths L (prompt L - N, then N new tokens)")
  p.add_argument("--new-tokens", type=int, default=64, help="N: tokens decoded per run (default 64)")
  p.add_argument("--kv-methods", default="fp", help=f"comma-separated subset of {','.join(KV_METHODS)}")
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
  cpus = sorted(os.sched_getaffinity(0))
  if args.threads < len(cpus):
    os.sched_setaffinity(0, cpus[:args.threads])  # before JAX creates its CPU client

  import jax
  import torch
  import transformers
  from qjax import assets, data
  transformers.utils.logging.disable_progress_bar()
  transformers.utils.logging.set_verbosity_error()
  torch.set_num_threads(args.threads)
  story = assets.asset(assets.DEFAULT_MODEL)
  text = data.read_text(assets.named_text("tinystories", assets.PPL_DATASETS))
  tokens = data.tokenize(data.load_tokenizer(story), text[:200_000])
  env = {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
         "python": platform.python_version(), "cpu_count": os.cpu_count(),
         "affinity_cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
         "jax_backend": jax.default_backend(), "repeats": args.repeats, "new_tokens": args.new_tokens,
         **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "XLA_FLAGS")}}
  out = {"env": env, "models": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      path = story
      if name == "llama8x512":
        path = os.path.join(tmp, name)
        make_llama8x512(path)
      out["models"][name] = {f"L{n}": bench(name, path, tokens, n, args.new_tokens, methods, args.repeats)
                             for n in lengths}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  sys.exit(main())
