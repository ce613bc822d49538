"""Sharded calibration, quantization, perplexity and generation against one device (the multi-device issue).

For each method (GPTQ act-order g128 by default, AWQ g128) the model is quantized on one device and under every
mesh; the script reports, per mesh, the share of weights whose integer codes equal one device's, the quantized
perplexity and its relative difference, the wall time, and whether the float model's perplexity and greedy
generation (8 prompts) match. The devices are XLA's forced host devices on CPU (``--devices``; set before JAX
starts), so on this 2-core machine a mesh shows correctness, not speed: all devices share the same cores.

  JAX_PLATFORMS=cpu python eval/mesh_parity.py --model llama8x512 --json out/mesh_parity.json
  python eval/mesh_parity.py --model stories260k --meshes data=2,model=4 --nsamples 8 --seqlen 128   # quick

Models: ``llama8x512`` (eval/bench_ppl.py's random 8-layer LLaMA, hidden 512, written by transformers; calibrated
and evaluated on TinyStories, whose tokenizer it shares), ``stories260k``, or any path ``qjax.load`` reads.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama8x512")
  p.add_argument("--methods", default="gptq,awq", help="comma-separated: gptq, awq")
  p.add_argument("--meshes", default="data=8;model=8;data=2,model=4", help="';'-separated data=D,model=M")
  p.add_argument("--devices", type=int, default=8, help="forced host devices (CPU)")
  p.add_argument("--bits", type=int, default=4)
  p.add_argument("--group-size", type=int, default=128)
  p.add_argument("--no-act-order", action="store_true", help="GPTQ in natural column order")
  p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
  p.add_argument("--seqlen", type=int, default=256, help="calibration and evaluation window length")
  p.add_argument("--eval-windows", type=int, default=16)
  p.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per prompt")
  p.add_argument("--json", help="write the results here")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  import jax
  import numpy as np

  import qjax
  from qjax.core import tree
  from qjax.core.mesh import MeshConfig
  from qjax.evaluation.generation import Generator
  from qjax.io import assets
  from qjax.io import text as data
  from qjax.methods import AWQConfig, GPTQConfig
  from qjax.models.sharding import shard_params

  with tempfile.TemporaryDirectory() as tmp:
    if args.model == "llama8x512":
      sys.path.insert(0, os.path.dirname(__file__))
      from bench_ppl import make_llama8x512
      path = os.path.join(tmp, "llama8x512")
      make_llama8x512(path)
      for f in assets.asset(assets.DEFAULT_MODEL).iterdir():      # the stories260K tokenizer (same vocabulary)
        if f.name.startswith(("tokenizer", "special_tokens")):
          shutil.copy2(f, path)
      loaded = qjax.load(path)
      tok = loaded.tokenizer
    else:
      loaded = qjax.load(str(assets.model_path(args.model)))
      tok = loaded.tokenizer
  calib = data.tokenize(tok, data.read_text(assets.asset(assets.CALIB_DATASETS["tinystories"])))
  evtext = data.tokenize(tok, data.read_text(assets.asset(assets.PPL_DATASETS["tinystories"])))
  evtext = evtext[: args.seqlen * args.eval_windows]
  configs = {"gptq": GPTQConfig(bits=args.bits, group_size=args.group_size, act_order=not args.no_act_order),
             "awq": AWQConfig(bits=args.bits, group_size=args.group_size)}
  meshes = [None] + [MeshConfig.parse(m) for m in args.meshes.split(";") if m.strip()]
  prompts = ["Once upon a time", "Lily went to the park", "The cat sat on", "Tom had a big red ball",
             "One day, a little bird", "The sun was hot", "Mom said", "There was a boy named"]

  def place(mesh_cfg):
    model = loaded.model if mesh_cfg is None else loaded.model.with_mesh(mesh_cfg.build())
    return model, shard_params(model, loaded.params)

  def log(*a):
    print(*a, file=sys.stderr, flush=True)

  out = {"model": args.model, "devices": jax.device_count(), "cores": os.cpu_count(),
         "load_average": os.getloadavg(), "jax": jax.__version__, "float": {}, "methods": {}}
  ref_tokens = ref_ppl = None
  for mc in meshes:
    name = str(mc) if mc else "1 device"
    model, params = place(mc)
    ppl = qjax.perplexity(model, params, evtext, args.seqlen, progress=False).ppl
    tokens = Generator(model, params, tok).generate(prompts, args.new_tokens, stop_tokens=()).tokens
    if mc is None:
      ref_tokens, ref_ppl = tokens, ppl
    out["float"][name] = {"ppl": ppl, "ppl_rel_diff": abs(ppl - ref_ppl) / ref_ppl,
                          "greedy_identical": tokens == ref_tokens}
    log(name, "float", out["float"][name])
  for method in args.methods.split(","):
    rule = qjax.Rule(loaded.model.family.linear_pattern, configs[method])
    res, ref = {}, None
    for mc in meshes:
      name = str(mc) if mc else "1 device"
      model, params = place(mc)
      t0 = time.perf_counter()
      q = qjax.quantize_model(model, params, qjax.Recipe(weights=(rule,)),
                              calibration=qjax.calibration_windows(model, calib, args.nsamples, args.seqlen))
      seconds = time.perf_counter() - t0
      codes = {p: np.asarray(v.unpacked_codes()) for p, v in tree.flatten(q.params).items()
               if hasattr(v, "unpacked_codes")}
      ppl = qjax.perplexity(q.model, q.params, evtext, args.seqlen, progress=False).ppl
      tokens = Generator(q.model, q.params, tok).generate(prompts, args.new_tokens, stop_tokens=()).tokens
      if ref is None:
        ref = (codes, ppl, tokens)
      same = sum(int((codes[p] == ref[0][p]).sum()) for p in codes)
      total = sum(c.size for c in codes.values())
      res[name] = {"codes_equal": same / total, "weights": total, "ppl": ppl,
                   "ppl_rel_diff": abs(ppl - ref[1]) / ref[1], "greedy_identical": tokens == ref[2],
                   "quantize_seconds": seconds, "compile_seconds": q.compile_seconds}
      log(name, method, res[name])
    out["methods"][method] = res
  print(json.dumps(out, indent=1))
  if args.json:
    from qjax.cli.common import write_json
    write_json(args.json, out)


if __name__ == "__main__":
  main()
