"""Command-line wiring of the weight quantization methods, shared by every entry point that quantizes
(``qjax.quantize`` and ``qjax.generate``, through :mod:`qjax.cli.recipe`): ``--method`` over the registry, each
method's flags as its config declares them (:mod:`qjax.cli.options`), the calibration flags and windows, and the
checks that need the model's shapes."""
from __future__ import annotations

import argparse
from pathlib import Path

from qjax import api
from qjax.calibration import Calibration, calibration_windows
from qjax.calibration.memory import check_memory_budget
from qjax.cli import common as cli
from qjax.cli import options
from qjax.core import tree
from qjax.core.errors import InputError
from qjax.evaluation import data_free
from qjax.io import assets
from qjax.io import text as data
from qjax.methods import registry, scaling
from qjax.methods.weights import awq, spqr, zeroquant


def _configs() -> dict[str, type]:
  """``{method name: config type}`` of every registered weight method."""
  return {name: m.config_type for name, m in registry.methods().items()}


def add_args(p: argparse.ArgumentParser):
  g = p.add_argument_group("weight quantization")
  g.add_argument("--method", default="none", choices=("none", *registry.methods()),
                 help="weight quantization method (default none)")
  c = p.add_argument_group("calibration (calibrated methods, --zq-lkd, --smoothquant, --kv-method kvquant)")
  src = c.add_mutually_exclusive_group()
  src.add_argument("--calib-text", help="calibration text file")
  src.add_argument("--calib-dataset", choices=(*assets.CALIB_DATASETS, cli.GENERATED),
                   help="named calibration text (default: the one paired with the first named --ppl-datasets "
                        "text, e.g. WikiText-2 validation for wikitext2; else tinystories); generated: data-free, "
                        "--nsamples windows of the float model's own text (LLM-QAT: a random first token, 3 "
                        "greedy, then sampled; seeded by --seed)")
  c.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
  c.add_argument("--calib-seqlen", type=int, help="tokens per window (default 2048 capped at the model context)")
  c.add_argument("--layer-report", action="store_true",
                 help="measure each decoder layer's relative output error against the float layer (one more layer "
                      "forward per layer)")
  options.add_flags(p, _configs(), "--method")


def config(args, given: frozenset[str]):
  """The method's frozen config from the flags given (None for ``--method none``); its ``__post_init__`` checks
  the values."""
  if args.method == "none":
    return None
  return options.build(registry.methods()[args.method].config_type, args, given)


def needs_calibration(args, cfg) -> bool:
  """Whether the run needs calibration windows (a calibrated method, ZeroQuant's LKD, or SmoothQuant)."""
  return ((cfg is not None and registry.method_for(cfg).needs_calibration(cfg))
          or getattr(args, "smoothquant", False))


def scopes(args, cfg):
  """``(flags, applies, needs)`` for :func:`qjax.cli.common.check_scopes`: the flags the selected method's config
  declares, and the calibration flags."""
  kvquant = getattr(args, "kv_method", None) == "kvquant"
  calibrated = needs_calibration(args, cfg)
  return [
      *options.scopes(_configs(), args.method, cfg, "--method"),
      (("calib_text", "calib_dataset"), calibrated or kvquant,
       "a step that calibrates (--method gptq, spqr or awq, --zq-lkd, --smoothquant or --kv-method kvquant)"),
      (("nsamples", "calib_seqlen"), calibrated, "a step that calibrates (--method gptq, spqr or awq, --zq-lkd or "
                                                  "--smoothquant; KVQuant: --kv-calib-nsamples)"),
  ]


def validate(args, cfg):
  """Checks of the calibration flags that need no model (the config checked itself when it was built)."""
  if getattr(args, "load", None) and args.method != "none":
    raise InputError("--load reads an already quantized checkpoint; use --model to quantize again")
  if not needs_calibration(args, cfg):
    return
  if args.nsamples < 1:
    raise InputError(f"--nsamples must be positive, got {args.nsamples}")
  if args.calib_seqlen is not None and args.calib_seqlen < 2:
    raise InputError(f"--calib-seqlen must be at least 2, got {args.calib_seqlen}")
  if args.calib_text and not Path(args.calib_text).is_file():
    raise InputError(f"--calib-text file {args.calib_text} does not exist")
  if args.calib_dataset != cli.GENERATED:
    cli.calibration_text(args)


def validate_for_model(model, params, recipe):
  """Checks of ``recipe`` (flag-built or from a file) that need the architecture, still before any long work:
  scale folding, ZeroQuant's distilled layers, and per rule a group size no wider than the linears it matches
  and SpQR's 2nd-level row groups dividing their output widths (the reference's rule; the library would handle a
  partial last row group)."""
  configs = [r.config for r in recipe.weights if r.config is not None]
  if (any(isinstance(c, awq.AWQConfig) for c in configs) or recipe.smoothquant is not None
          or recipe.outliers is not None):
    scaling.check_foldable(model.config)
  flat, matched = tree.flatten(params), api.match_rules(params, recipe.weights)
  for rule in recipe.weights:
    cfg, paths = rule.config, [p for p, r in matched.items() if r is rule]
    if isinstance(cfg, zeroquant.ZeroQuantConfig):
      cfg.distilled(model.config.num_layers)
    widths = {flat[p].shape[1] for p in paths}
    narrow = sorted(w for w in widths if w < getattr(cfg, "group_size", -1))
    if narrow:
      raise InputError(f"--groupsize {cfg.group_size} is wider than the input width {narrow[0]} of some linears "
                       f"(input widths: {', '.join(map(str, sorted(widths)))}): such a group would span the whole "
                       f"row, i.e. per channel; use --groupsize -1 (per channel) or at most {narrow[0]}")
    if isinstance(cfg, spqr.SpQRConfig):
      for p in paths:
        if flat[p].shape[0] % cfg.qq_groupsize:
          raise InputError(f"--qq-groupsize {cfg.qq_groupsize} does not divide the output width "
                           f"{flat[p].shape[0]} of {p}")


def calibration_data(args, model, params, tokenizer, seed: int, progress: bool = True) -> Calibration:
  """The calibration (or training) windows of the flags: ``--nsamples`` seeded windows of ``--calib-seqlen``
  tokens of the calibration text, or, with ``--calib-dataset generated``, of the float model's own text."""
  seqlen = args.calib_seqlen or min(2048, model.config.max_position_embeddings)
  if seqlen > model.config.max_position_embeddings:
    raise InputError(f"--calib-seqlen {seqlen} exceeds the model context ({model.config.max_position_embeddings})")
  if args.calib_dataset == cli.GENERATED:
    check_memory_budget(model, args.nsamples, seqlen)
    windows = data_free.generated_windows(model, params, args.nsamples, seqlen, seed=seed, progress=progress)
    return Calibration(model, windows, args.layer_report)
  path = cli.calibration_text(args)
  tokens = data.tokenize(tokenizer, data.read_text(path))
  if len(tokens) < seqlen + 1:
    default = min(2048, model.config.max_position_embeddings)
    raise InputError(f"calibration text {path} has {len(tokens)} tokens, fewer than one window of --calib-seqlen "
                     f"{seqlen} (+1) (default {default}, the model context capped at 2048): give a longer "
                     f"--calib-text or a smaller --calib-seqlen")
  return calibration_windows(model, tokens, args.nsamples, seqlen, seed, layer_report=args.layer_report)
