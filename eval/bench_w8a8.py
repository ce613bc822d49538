"""W8A8 forward-throughput benchmark on this CPU: float32, fake-quantized W8A8 and real int8 W8A8 in qjax, against
transformers + torch float32 and torch's dynamic int8 linears (``torch.ao.quantization.quantize_dynamic``, fbgemm
int8 GEMMs with per-tensor dynamic activation scales) in the same run.

Model: ``llama8x512`` (``bench_ppl.make_llama8x512``: 8 layers, hidden 512, MLP 1376, random weights; vocab 512),
``--nsamples`` windows of ``--seqlen`` tokens of the TinyStories eval text, batch ``--batch-size``. qjax paths
(all ``jax.jit``, the same ``qjax.evaluation.perplexity.perplexity`` call, compile excluded):

* ``qjax_fp32``: the float model;
* ``qjax_w8a8_fake``: RTN W8 per-channel weights (``QArray``, dequantize + matmul) and 8-bit per-token
  activations quantize-dequantized in float;
* ``qjax_w8a8_int8``: the same codes as ``Int8Array`` and ``int8 x int8 -> int32`` ``dot_general``.

Peers: ``torch_fp32`` (``AutoModelForCausalLM``, sdpa) and ``torch_dynamic_int8`` (decoder linears only; the
``lm_head`` stays float in both frameworks). Reported: tokens per second
(best of ``--repeats`` alternating rounds), ppl of each path (fake and int8 must agree), and ratios against
``qjax_fp32`` and the torch peers. On this CPU XLA's int8 dot runs at about the float rate (see
``../shared/reference/ecosystem-notes.md``), so int8 buys memory, not speed, here.

Run (a few minutes on 2 cores):
  JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 .venv/bin/python eval/bench_w8a8.py
Prints one JSON object to stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see eval/bench_ppl.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ppl import environment, log, make_llama8x512, pin_threads, torch_ppl  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--nsamples", type=int, default=16, help="windows (default 16)")
  p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
  p.add_argument("--batch-size", type=int, default=4, help="windows per forward call (default 4)")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both frameworks (default: all)")
  p.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best of each is reported")
  args = p.parse_args(argv)
  pin_threads(args.threads)

  import jax
  import torch
  import transformers
  from transformers import AutoModelForCausalLM

  from qjax.core.formats.int8 import to_int8
  from qjax.evaluation import perplexity
  from qjax.io import assets
  from qjax.io import text as data
  from qjax.io.hf import load_model
  from qjax.methods.activations import quantizers as act_quant
  from qjax.methods.weights import rtn
  transformers.utils.logging.disable_progress_bar()
  torch.set_num_threads(args.threads)
  story = assets.asset(assets.DEFAULT_MODEL)
  tokens = data.tokenize(data.load_tokenizer(story), data.read_text(assets.named_text("tinystories",
                                                                                        assets.PPL_DATASETS)))
  w = perplexity.windows(tokens, args.seqlen, args.nsamples)
  with tempfile.TemporaryDirectory() as tmp:
    make_llama8x512(tmp)
    model, params = load_model(tmp)
    tm = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa").eval()
  decoder_linears = {n for n, m in tm.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
  tq = torch.ao.quantization.quantize_dynamic(tm, decoder_linears, dtype=torch.qint8, inplace=False)
  q = rtn.quantize(params, rtn.RTNConfig(bits=8, scale_dtype="float32"), progress=False)[0]
  a8 = model.with_hooks(act_quant.ActQuantConfig(bits=8).hooks())
  qjax_runs = {"qjax_fp32": (model, params), "qjax_w8a8_fake": (a8, q), "qjax_w8a8_int8": (a8, to_int8(q))}
  torch_runs = {"torch_fp32": tm, "torch_dynamic_int8": tq}
  best, ppl = {}, {}
  log(f"[llama8x512] {len(w)} windows x {args.seqlen} tokens, batch {args.batch_size}, {args.repeats} rounds")
  for name, (m, prm) in qjax_runs.items():  # compile once, untimed
    perplexity.perplexity(m, prm, tokens, args.seqlen, args.batch_size, args.batch_size, progress=False)
  for i in range(args.repeats):
    order = list(qjax_runs) + list(torch_runs)
    for name in order if i % 2 == 0 else order[::-1]:
      if name in qjax_runs:
        r = perplexity.perplexity(*qjax_runs[name], tokens, args.seqlen, len(w), args.batch_size, progress=False)
        pp, tps = r.ppl, r.tokens_per_second
      else:
        pp, tps = torch_ppl(torch_runs[name], w, args.batch_size)
      best[name], ppl[name] = max(best.get(name, 0.0), tps), pp
      log(f"[llama8x512] round {i}: {name:20s} {tps:9.0f} tok/s  ppl {pp:.4f}")
  out = {
      "env": environment(repeats=args.repeats),
      "windows": len(w), "seqlen": args.seqlen, "batch_size": args.batch_size,
      "tokens_per_second": {k: round(v, 1) for k, v in best.items()},
      "ppl": ppl,
      "ratios": {
          "w8a8_fake_vs_fp32": best["qjax_w8a8_fake"] / best["qjax_fp32"],
          "w8a8_int8_vs_fp32": best["qjax_w8a8_int8"] / best["qjax_fp32"],
          "w8a8_int8_vs_fake": best["qjax_w8a8_int8"] / best["qjax_w8a8_fake"],
          "qjax_fp32_vs_torch_fp32": best["qjax_fp32"] / best["torch_fp32"],
          "qjax_int8_vs_torch_dynamic_int8": best["qjax_w8a8_int8"] / best["torch_dynamic_int8"]},
      "ppl_rel_diff_int8_vs_fake": abs(ppl["qjax_w8a8_int8"] / ppl["qjax_w8a8_fake"] - 1),
      "weight_bytes": {"fp32": sum(x.nbytes for x in jax.tree_util.tree_leaves(params)),
                       "int8": sum(x.nbytes for x in jax.tree_util.tree_leaves(to_int8(q)))},
  }
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
