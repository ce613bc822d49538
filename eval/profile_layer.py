"""Where a layer-wise calibration step spends its time: one decoder layer of a real model on ``--windows`` x
``--seqlen`` WikiText-2 calibration windows, the statistics pass (``capture.collect_stats``: float layer plus
Hessians) and the layer forward (``capture.run_layer``), compile excluded (best of ``--repeats``). Prints JSON.

``python eval/profile_layer.py --model smollm2-135m --windows 16`` (the README's per-layer figures)."""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

import qjax
from qjax import calibration
from qjax.core import tree
from qjax.io import assets
from qjax.io import text as data
from qjax.models import capture


def best_seconds(f, *args, repeats):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return round(min(times), 3)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--windows", type=int, default=16)
  p.add_argument("--seqlen", type=int, default=2048)
  p.add_argument("--layer", type=int, default=0)
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args(argv)
  loaded = qjax.load(args.model)
  model, params = loaded.model, loaded.params
  text = data.read_text(assets.named_text("wikitext2", assets.CALIB_DATASETS))
  windows = calibration.sample_windows(data.tokenize(loaded.tokenizer, text), args.windows, args.seqlen)
  x = capture.embed_windows(model, params, jnp.asarray(windows, jnp.int32))
  prefix = model.family.layer_path(args.layer)
  layer = jax.tree.map(jnp.asarray, tree.subtree(tree.flatten(params), prefix))
  names = capture.layer_linears(model, prefix, (".*",), tuple(r for r, _ in model.family.linears))
  out = {"model": args.model, "windows": args.windows, "seqlen": args.seqlen, "layer": args.layer,
         "stats_s": best_seconds(lambda: capture.collect_stats(model, layer, x, names), repeats=args.repeats),
         "forward_s": best_seconds(lambda: capture.run_layer(model, layer, x), repeats=args.repeats),
         "load_avg": os.getloadavg()}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
