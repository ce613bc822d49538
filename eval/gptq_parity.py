"""Whole-model GPTQ parity: qjax's layer-wise pipeline versus an independent torch one on the same model and the
same calibration windows, compared by perplexity and by per-layer GPTQ losses (prints JSON).

qjax: ``qjax.methods.weights.gptq.quantize`` (float32 scales, so both sides dequantize to the same grid) then
``qjax.evaluation.perplexity``. torch: ``eval/torch_gptq.gptq_model`` (the reference ``llama_sequential`` over the
transformers model, the reference ``fasterquant`` per linear) then a torch perplexity over the same windows. The
calibration windows and the evaluation tokens come from qjax's tokenization of the named texts, so both sides see
the same token ids. Example (SmolLM2-135M as an fp32 HF folder)::

    OMP_NUM_THREADS=1 python eval/gptq_parity.py --model /tmp/smollm2 --wbits 4 --groupsize 128 \\
        --calib-dataset wikitext2 --nsamples 16 --calib-seqlen 512 --ppl-dataset wikitext2 --seqlen 512 \\
        --eval-nsamples 8 [--act-order --static-groups]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def qjax_run(model_dir, windows, eval_tokens, seqlen, nsamples, config):
  from qjax import calibration
  from qjax.evaluation import perplexity
  from qjax.io.hf import load_model
  from qjax.methods.weights import gptq
  model, params = load_model(model_dir)
  t0 = time.perf_counter()
  qparams, report = gptq.quantize(params, gptq.GPTQConfig(**config, scale_dtype="float32"),
                                  calibration=calibration.Calibration(model, windows), progress=False)
  seconds = time.perf_counter() - t0
  ppl = perplexity.perplexity(model, qparams, eval_tokens, seqlen, nsamples, progress=False).ppl
  return {"ppl": ppl, "seconds": seconds, "layer_losses": [sum(l.linear_losses.values()) for l in report.layers]}


def torch_run(model_dir, windows, eval_tokens, seqlen, nsamples, config, hessian_dtype="float32"):
  import torch
  from torch_gptq import gptq_model, perplexity
  from transformers import AutoModelForCausalLM
  torch.set_num_threads(1)
  model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
  t0 = time.perf_counter()
  report = gptq_model(model, windows, hessian_dtype=getattr(torch, hessian_dtype), **config)
  seconds = time.perf_counter() - t0
  return {"ppl": perplexity(model, eval_tokens, seqlen, nsamples), "seconds": seconds,
          "layer_losses": [sum(l.values()) for l in report["layers"]]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", required=True, help="HF LLaMA/OPT folder")
  p.add_argument("--wbits", type=int, default=4)
  p.add_argument("--groupsize", type=int, default=128)
  p.add_argument("--sym", action="store_true")
  p.add_argument("--act-order", action="store_true")
  p.add_argument("--static-groups", action="store_true")
  p.add_argument("--true-sequential", action="store_true")
  p.add_argument("--calib-dataset", default="wikitext2")
  p.add_argument("--nsamples", type=int, default=16)
  p.add_argument("--calib-seqlen", type=int, default=512)
  p.add_argument("--ppl-dataset", default="wikitext2")
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--eval-nsamples", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--spread", action="store_true",
                 help="also run the torch pipeline with float64 Hessian accumulation: how far float rounding alone "
                      "moves the reference's result")
  args = p.parse_args(argv)
  from qjax.calibration import sample_windows
  from qjax.io import assets
  from qjax.io import text as data
  tok = data.load_tokenizer(args.model)
  calib = data.tokenize(tok, data.read_text(assets.named_text(args.calib_dataset, assets.CALIB_DATASETS)))
  windows = sample_windows(calib, args.nsamples, args.calib_seqlen, args.seed)
  eval_tokens = data.tokenize(tok, data.read_text(assets.named_text(args.ppl_dataset, assets.PPL_DATASETS)))
  config = dict(bits=args.wbits, group_size=args.groupsize, sym=args.sym, act_order=args.act_order,
                static_groups=args.static_groups, true_sequential=args.true_sequential)
  q = qjax_run(args.model, windows, eval_tokens, args.seqlen, args.eval_nsamples, config)
  t = torch_run(args.model, windows, eval_tokens, args.seqlen, args.eval_nsamples, config)
  ql, tl = np.asarray(q["layer_losses"]), np.asarray(t["layer_losses"])
  out = {"config": {**vars(args)}, "qjax": q, "torch": t, "ppl_rel_diff": abs(q["ppl"] / t["ppl"] - 1),
         "layer_loss_max_rel_diff": float(np.max(np.abs(ql / tl - 1)))}
  if args.spread:
    t64 = torch_run(args.model, windows, eval_tokens, args.seqlen, args.eval_nsamples, config, "float64")
    out["torch_float64_hessian"] = t64
    out["spread_ppl_rel_diff"] = abs(t64["ppl"] / t["ppl"] - 1)
    out["spread_layer_loss_max_rel_diff"] = float(np.max(np.abs(np.asarray(t64["layer_losses"]) / tl - 1)))
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
