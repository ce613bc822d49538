"""End-to-end kernel parity: the same quantized model through every kernel path gives the same numbers.

One GPTQ model (W4, groups of 64, act-order with static groups; calibrated on ``--calib-nsamples`` windows of
``--calib-seqlen`` tokens of the WikiText-2 validation text) with a KIVI-2 cache (G 32, R 128; G = head_dim and
R = 4 G for narrower heads), evaluated with
``CausalLM.kernel`` = each of ``--kernels`` (default ``auto,xla``: on CPU the native kernels where they apply, and
the XLA reference everywhere):

  * perplexity on the WikiText-2 test text (``--seqlen``, first ``--eval-nsamples`` windows), weights only and
    with the KIVI-2 quantized past (``qjax.evaluation.perplexity``, the model's ``kv_past`` hook);
  * greedy generation of ``--new-tokens`` tokens through the KIVI-2 cache and through the dense cache
    (``qjax.evaluation.generation.Generator``) after a prompt of the first ``--prompt-tokens`` tokens of the test
    text (so that the KIVI store, not only its residual window, is read);
  * the kernel path of the linears, the head and the cache attention (what the CLIs' summaries print).

Every kernel is compared with the first: the relative perplexity difference (the issue's bar: 1e-5) and whether
the generated tokens are identical. Prints one JSON object; progress on stderr.

Run: ``OMP_NUM_THREADS=1 JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 python eval/kernel_parity.py`` (a few minutes on
SmolLM2-135M), or ``--model stories260k --seqlen 256 --calib-seqlen 256 --prompt-tokens 100`` for the small model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--kernels", default="auto,xla")
  p.add_argument("--seqlen", type=int, default=2048)
  p.add_argument("--eval-nsamples", type=int, default=4)
  p.add_argument("--calib-nsamples", type=int, default=32)
  p.add_argument("--calib-seqlen", type=int, default=512)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--prompt-tokens", type=int, default=400,
                 help="prompt: the first N tokens of the WikiText-2 test text (long enough that KIVI quantizes some)")
  args = p.parse_args(argv)

  import qjax
  from qjax.evaluation.generation import Generator
  from qjax.evaluation.kernel_paths import attention_path, kernel_paths
  from qjax.io import assets
  from qjax.io import text as data
  from qjax.methods import GPTQConfig, KIVIConfig
  from qjax.models.kv_cache import KVCache

  m = qjax.load(args.model)
  tok = m.tokenizer
  calib = data.tokenize(tok, data.read_text(assets.named_text("wikitext2", assets.CALIB_DATASETS)))
  evals = data.tokenize(tok, data.read_text(assets.named_text("wikitext2", assets.PPL_DATASETS)))
  g = min(32, m.model.config.head_dim)             # stories260K's heads are 8 wide
  kv_cfg = KIVIConfig(bits=2, group_size=g, residual=4 * g)
  recipe = qjax.Recipe(weights=(qjax.Rule(m.model.family.linear_pattern, GPTQConfig(
      bits=4, group_size=64, act_order=True, static_groups=True)),), kv=kv_cfg)
  log(f"GPTQ W4 g64 on {args.calib_nsamples} x {args.calib_seqlen} calibration tokens ...")
  q = qjax.quantize_model(m.model, m.params, recipe,
                          calibration=qjax.calibration_windows(m.model, calib, args.calib_nsamples,
                                                               args.calib_seqlen))
  prompt = [int(t) for t in evals[:args.prompt_tokens]]
  runs = {}
  for kernel in args.kernels.split(","):
    model = q.model.with_kernel(kernel)
    r = {"paths": {**kernel_paths(model, q.params, cache_factory=q.kv.cache_factory),
                   "attention_dense": attention_path(model)}}
    weights_only = model.with_hooks(dataclasses.replace(model.hooks, kv_past=None))   # q.model has the KIVI past
    r["ppl"] = qjax.perplexity(weights_only, q.params, evals, args.seqlen, args.eval_nsamples, progress=False).ppl
    r["ppl_kivi2"] = qjax.perplexity(model, q.params, evals, args.seqlen, args.eval_nsamples, progress=False).ppl
    for name, factory in (("kivi2", q.kv.cache_factory), ("dense", KVCache.dense)):
      gen = Generator(model, q.params, tok, cache_factory=factory).generate([prompt], args.new_tokens, stop_tokens=())
      r[f"tokens_{name}"] = gen.tokens[0]
      r[f"decode_tokens_per_second_{name}"] = round(gen.decode_tokens_per_second, 1)
    log(f"[{kernel}] ppl {r['ppl']:.6f}, KIVI-2 past {r['ppl_kivi2']:.6f}, "
        f"decode {r['decode_tokens_per_second_kivi2']} / {r['decode_tokens_per_second_dense']} tok/s (KIVI-2 / dense)")
    runs[kernel] = r
  first = next(iter(runs.values()))
  compare = {k: {"ppl_rel_diff": abs(r["ppl"] - first["ppl"]) / first["ppl"],
                 "ppl_kivi2_rel_diff": abs(r["ppl_kivi2"] - first["ppl_kivi2"]) / first["ppl_kivi2"],
                 "tokens_identical_kivi2": r["tokens_kivi2"] == first["tokens_kivi2"],
                 "tokens_identical_dense": r["tokens_dense"] == first["tokens_dense"]} for k, r in runs.items()}
  json.dump({"model": args.model, "recipe": f"gptq w4 g64 act-order static groups + kivi-2 (G {g}, R {4 * g})",
             "calibration": [args.calib_nsamples, args.calib_seqlen], "seqlen": args.seqlen,
             "eval_nsamples": args.eval_nsamples, "runs": runs, "vs_first": compare}, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  main()
