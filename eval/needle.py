"""Needle in a haystack: can the model retrieve a fact planted at a chosen depth of a long context, with a full-
precision or a quantized KV cache?

Prompt: sentences of a local text (default the TinyStories eval text; ``--haystack FILE``) up to ``L`` tokens,
with the needle sentence ``"Her name was KEY."`` inserted at the sentence boundary nearest the fraction ``depth``
of their tokens, ending with the question ``"... Her name was"``. The model decodes ``--new-tokens`` greedy
tokens through the cache; a trial scores 1 when the first word of the completion is exactly ``KEY`` (keys are
names drawn with the seed: a TinyStories model copies a name it has seen far more readily than an arbitrary
word). Grid: ``--lengths`` x ``--depths`` x ``--trials``, for each KV method of ``--kv-methods`` (``fp``,
``kivi-B``, ``kvquant-B``; the KIVI/KVQuant settings are the ``--kv-*`` flags of ``qjax.quantize``). Small models
such as stories260K answer by copying ("induction"), so accuracy falls with length; the harness is the same for
any LLaMA/OPT checkpoint (``--model``).

Outputs: one JSON object on stdout (accuracy grid per method, effective bits, every trial's prompt length, key and
completion) and, with ``--png FILE``, a heatmap per method (depth x length, accuracy).

Run (about a minute on 2 cores):
  JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 .venv/bin/python eval/needle.py --kv-methods fp,kivi-2,kivi-4,kvquant-4 \\
      --kv-group-size 8 --kv-residual 32 --png needle.png
"""
from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np

KEYS = ("Lily", "Max", "Sue", "Tom", "Ben", "Spot", "Mia", "Sam", "Anna", "Bob", "Jack", "Lucy", "Zoe", "Tim",
        "Kitty", "Molly")
NEEDLE, QUESTION = "Her name was {key}.", "Her name was"


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def sentences(text: str) -> list[str]:
  return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 1]


def build_prompt(tok, pool: list[str], start: int, length: int, depth: float, key: str) -> list[int]:
  """Token ids of a prompt of at most ``length`` tokens: haystack sentences from ``pool[start:]``, the needle at
  the sentence boundary nearest the fraction ``depth`` of the haystack's tokens, the question at the end."""
  needle, question = NEEDLE.format(key=key), QUESTION
  budget = length - len(tok(f" {needle} {question}", add_special_tokens=False)["input_ids"]) - 2
  hay, ends, used = [], [0], 0
  for s in pool[start:] + pool[:start]:
    n = len(tok(" " + s, add_special_tokens=False)["input_ids"])
    if used + n > budget:
      break
    hay.append(s)
    used += n
    ends.append(used)
  cut = int(np.argmin(np.abs(np.asarray(ends) - depth * used)))  # the sentence boundary nearest the token depth
  text = " ".join(hay[:cut] + [needle] + hay[cut:] + [question])
  return tok(text)["input_ids"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", help="HF model folder (default: assets stories260K)")
  p.add_argument("--haystack", help="text file for the haystack (default: TinyStories eval text)")
  p.add_argument("--lengths", default="64,128,256,512", help="prompt lengths in tokens")
  p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths (fraction of the haystack)")
  p.add_argument("--trials", type=int, default=4, help="prompts per (length, depth), each with its own key")
  p.add_argument("--new-tokens", type=int, default=4, help="greedy tokens decoded per prompt")
  p.add_argument("--kv-methods", default="fp,kivi-2,kivi-4,kvquant-4", help="fp, kivi-B, kvquant-B, ...")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--png", help="write a heatmap per method to this PNG file")
  p.add_argument("--calib-dataset", default="tinystories", help="KVQuant calibration text (named)")
  args = p.parse_args(argv)

  from qjax import api
  from qjax.calibration import calibration_windows
  from qjax.evaluation import generation
  from qjax.io import assets
  from qjax.io import text as data
  from qjax.io.hf import load_model
  from qjax.methods import registry
  from qjax.models.kv_cache import KVCache
  path = args.model or assets.asset(assets.DEFAULT_MODEL)
  model, params = load_model(path)
  tok = data.load_tokenizer(path)
  pool = sentences(data.read_text(args.haystack or assets.named_text("tinystories", assets.PPL_DATASETS)))
  lengths = [int(x) for x in args.lengths.split(",")]
  depths = [float(x) for x in args.depths.split(",")]
  rng = np.random.default_rng(args.seed)
  grid = [(L, d, t, KEYS[rng.integers(len(KEYS))], int(rng.integers(len(pool)))) for L in lengths for d in depths
          for t in range(args.trials)]
  room = model.config.max_position_embeddings - args.new_tokens  # prompts at the context edge leave room to decode
  prompts = {(L, d, t): build_prompt(tok, pool, start, min(L, room), d, key) for L, d, t, key, start in grid}
  out = {"model": str(path), "lengths": lengths, "depths": depths, "trials": args.trials, "methods": {}}
  for spec in args.kv_methods.split(","):
    method, _, bits = spec.partition("-")
    factory, effective_bits = KVCache.dense, 32.0
    if method != "fp":
      cfg = registry.kv_methods()[method].config_type(bits=int(bits))
      windows = None
      if registry.kv_methods()[method].needs_calibration:
        calib = data.tokenize(tok, data.read_text(assets.named_text(args.calib_dataset, assets.CALIB_DATASETS)))
        windows = calibration_windows(model, calib, cfg.nsamples, cfg.seqlen, args.seed)
      kv = api.quantize_model(model, params, api.Recipe(kv=cfg), kv_calibration=windows).kv
      factory, effective_bits = kv.cache_factory, kv.effective_bits
    gen = generation.Generator(model, params, tok, cache_factory=factory)
    acc = np.zeros((len(depths), len(lengths)))
    trials = []
    for j, L in enumerate(lengths):
      batch = [(d, t, key) for LL, d, t, key, _ in grid if LL == L]
      r = gen.generate([prompts[(L, d, t)] for d, t, _ in batch], args.new_tokens,
                       max_len=min(L, room) + args.new_tokens,
                       stop_tokens=())
      for (d, t, key), text in zip(batch, r.texts):
        words = re.findall(r"[A-Za-z]+", text)
        hit = bool(words) and words[0].lower() == key.lower()
        acc[depths.index(d), j] += hit / args.trials
        trials.append({"length": L, "prompt_tokens": len(prompts[(L, d, t)]), "depth": d, "key": key,
                       "completion": text, "hit": hit})
    bpt = r.cache_bytes_per_token
    log(f"[{spec}] accuracy by length {dict(zip(lengths, acc.mean(0).round(3).tolist()))}; "
        f"cache {bpt:,.0f} bytes/token")
    out["methods"][spec] = {"accuracy": acc.tolist(), "mean_accuracy": float(acc.mean()),
                            "effective_bits": effective_bits,
                            "cache_bytes_per_token": bpt, "trials": trials}
  if args.png:
    _heatmap(out, args.png)
  print(json.dumps(out, indent=1))


def _heatmap(out: dict, png: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(out["methods"])
  fig, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names), 3), squeeze=False, layout="constrained")
  for ax, name in zip(axes[0], names):
    m = out["methods"][name]
    im = ax.imshow(np.asarray(m["accuracy"]), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(out["lengths"])), out["lengths"])
    ax.set_yticks(range(len(out["depths"])), out["depths"])
    ax.set_xlabel("prompt tokens")
    ax.set_title(f"{name} ({m['effective_bits']:.1f} bits)", fontsize=9)
  axes[0][0].set_ylabel("needle depth")
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact match")
  fig.savefig(png, dpi=120)


if __name__ == "__main__":
  main()
