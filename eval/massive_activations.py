"""Per decoder layer, the largest input activation of each linear and the spread of its Hessian diagonal
(``max / median`` of ``mean x^2`` over channels), measured on calibration windows with qjax's own layer-wise
pipeline (``qjax.calibration.layerwise.walk_layers`` and ``collect_stats``, float model). Large values mark the "massive
activations" that make GPTQ's column order matter (see the README's GPTQ section). Prints JSON.

    python eval/massive_activations.py --model /tmp/smollm2 --calib-dataset wikitext2 --nsamples 4 --seqlen 512
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", required=True)
  p.add_argument("--calib-dataset", default="wikitext2")
  p.add_argument("--nsamples", type=int, default=4)
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  from qjax import calibration
  from qjax.io import assets
  from qjax.io import text as data
  from qjax.io.hf import load_model
  from qjax.models import capture
  model, params = load_model(args.model)
  tok = data.load_tokenizer(args.model)
  tokens = data.tokenize(tok, data.read_text(assets.named_text(args.calib_dataset, assets.CALIB_DATASETS)))
  calib = calibration.calibration_windows(model, tokens, args.nsamples, args.seqlen, args.seed)
  names = tuple(model.family.linear_path(r) for r, _ in model.family.linears)
  rows = []

  def process(i, prefix, layer, x):
    stats = capture.collect_stats(model, layer, x, names, ("hessian", "absmax"))
    row = {"layer": i}
    for n in names:
      d = np.diag(np.asarray(stats[n]["hessian"]))
      row[n] = {"max_abs_input": float(np.max(stats[n]["absmax"])),
                "hessian_diag_max_over_median": float(d.max() / max(np.median(d), 1e-30))}
    rows.append(row)
    return layer, {}

  calibration.walk_layers(params, calib, process, progress=False)
  print(json.dumps({"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "layers": rows},
                   indent=1))


if __name__ == "__main__":
  main()
