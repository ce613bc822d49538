"""Command-line wiring of the weight quantization methods, shared by every entry point that quantizes
(``qjax.quantize`` and ``qjax.generate``, through :mod:`qjax.cli.recipe`): flags, up-front validation, config
construction, calibration data and the call into each method's model-level transform."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from qjax.calibration import Calibration, calibration_windows
from qjax.core import tree
from qjax.core.errors import InputError
from qjax.io import assets
from qjax.io import text as data
from qjax.methods import scaling
from qjax.methods.weights import awq, gptq, llm_int8, rtn, spqr, zeroquant

METHODS = ("none", "rtn", "gptq", "spqr", "awq", "zeroquant", "llm_int8")
CALIBRATED = ("gptq", "spqr", "awq")


def needs_calibration(args) -> bool:
  """Whether the run needs calibration windows (a calibrated method, ZeroQuant's LKD, or SmoothQuant)."""
  return (args.method in CALIBRATED or (args.method == "zeroquant" and args.zq_lkd)
          or getattr(args, "smoothquant", False))


def add_args(p: argparse.ArgumentParser):
  g = p.add_argument_group("weight quantization")
  g.add_argument("--method", default="none", choices=METHODS, help="weight quantization method")
  g.add_argument("--wbits", type=int, default=4, help="weight bits, 2..8 (default 4)")
  g.add_argument("--groupsize", type=int, default=-1, help="input columns per group; -1 = per output channel")
  g.add_argument("--sym", action="store_true", help="symmetric weight quantization (default asymmetric)")
  c = p.add_argument_group("calibration (gptq, spqr, smoothquant)")
  src = c.add_mutually_exclusive_group()
  src.add_argument("--calib-text", help="calibration text file")
  src.add_argument("--calib-dataset", default="tinystories",
                   help=f"named calibration text ({', '.join(assets.CALIB_DATASETS)}; default tinystories)")
  c.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
  c.add_argument("--calib-seqlen", type=int, help="tokens per window (default 2048 capped at the model context)")
  c.add_argument("--percdamp", type=float, default=0.01, help="Hessian damping, fraction of mean(diag H)")
  c.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                 help="quantize columns by descending diag(H) (default: on for gptq, off for spqr)")
  c.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                 help="gptq: fit all groups up front, contiguous with act-order (default: on with act-order and "
                      "groups)")
  c.add_argument("--true-sequential", action="store_true", help="quantize sub-groups in order, re-collecting inputs")
  c.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block (default 128)")
  s = p.add_argument_group("SpQR")
  s.add_argument("--qq-scale-bits", type=int, default=3, help="bits of the 2nd-level scale quantization")
  s.add_argument("--qq-zero-bits", type=int, default=3, help="bits of the 2nd-level zero quantization")
  s.add_argument("--qq-groupsize", type=int, default=16, help="output rows sharing 2nd-level statistics")
  s.add_argument("--outlier-threshold", type=float, default=math.inf, help="relative outlier threshold (inf: none)")
  s.add_argument("--simplified-outliers", action="store_true", help="skip leave-one-out outlier pre-detection")
  a = p.add_argument_group("AWQ")
  a.add_argument("--awq-grid", type=int, default=20, help="alpha grid points in [0, 1) (default 20)")
  a.add_argument("--no-awq-clip", action="store_true", help="skip the clipping-range search")
  z = p.add_argument_group("ZeroQuant (MLP weight bits: --wbits; activations: --abits)")
  z.add_argument("--zq-attn-bits", type=int, default=8, help="attention (q, k, v, o) weight bits (default 8)")
  z.add_argument("--zq-lkd", action="store_true", help="layer-by-layer knowledge distillation (uses calibration)")
  z.add_argument("--lkd-steps", type=int, default=300, help="AdamW steps per distilled layer (default 300)")
  z.add_argument("--lkd-lr", type=float, default=1e-4, help="peak learning rate, cosine decay (default 1e-4)")
  z.add_argument("--lkd-batch", type=int, default=4, help="calibration windows per step (default 4)")
  z.add_argument("--lkd-layers", help="comma-separated layer indices to distill (negative from the end; "
                 "default all)")
  i = p.add_argument_group("LLM.int8")
  i.add_argument("--int8-threshold", type=float, default=6.0, help="outlier feature threshold (default 6.0)")


def resolve_defaults(args):
  """Fills the defaults that depend on the method: GPTQ runs with act-order and (with groups) static groups
  unless ``--no-act-order`` / ``--no-static-groups``; SpQR without act-order unless ``--act-order``."""
  if args.act_order is None:
    args.act_order = args.method == "gptq"
  if args.static_groups is None:
    args.static_groups = args.method == "gptq" and args.act_order and args.groupsize > 0


def scopes(args):
  """``(flags, applies, needs)`` for :func:`qjax.cli.common.check_scopes`: which weight flags each method reads."""
  m = args.method
  calibrated = needs_calibration(args)
  kvquant = getattr(args, "kv_method", None) == "kvquant"
  return [
      (("wbits", "groupsize"), m in ("rtn", "gptq", "spqr", "awq", "zeroquant"),
       "a weight method that uses them (--method rtn, gptq, spqr, awq or zeroquant)"),
      (("sym",), m in ("rtn", "gptq", "spqr", "awq"), "--method rtn, gptq, spqr or awq"),
      (("calib_text", "calib_dataset"), calibrated or kvquant,
       "a step that calibrates (--method gptq, spqr or awq, --zq-lkd, --smoothquant or --kv-method kvquant)"),
      (("nsamples", "calib_seqlen"), calibrated, "a step that calibrates (--method gptq, spqr or awq, --zq-lkd or "
                                                  "--smoothquant; KVQuant: --kv-calib-nsamples)"),
      (("percdamp", "block_size", "true_sequential", "act_order"), m in ("gptq", "spqr"), "--method gptq or spqr"),
      (("static_groups",), m == "gptq", "--method gptq"),
      (("qq_scale_bits", "qq_zero_bits", "qq_groupsize", "outlier_threshold", "simplified_outliers"), m == "spqr",
       "--method spqr"),
      (("awq_grid", "no_awq_clip"), m == "awq", "--method awq"),
      (("zq_attn_bits", "zq_lkd"), m == "zeroquant", "--method zeroquant"),
      (("lkd_steps", "lkd_lr", "lkd_batch", "lkd_layers"), m == "zeroquant" and args.zq_lkd,
       "--method zeroquant --zq-lkd"),
      (("int8_threshold",), m == "llm_int8", "--method llm_int8"),
  ]


def validate(args):
  """Checks that need no model (run before any loading); :func:`resolve_defaults` has run."""
  if not 2 <= args.wbits <= 8:
    raise InputError(f"--wbits must be between 2 and 8, got {args.wbits}")
  if args.groupsize == 0 or args.groupsize < -1:
    raise InputError(f"--groupsize must be -1 (per channel) or a positive number of columns, got {args.groupsize}")
  if getattr(args, "load", None) and args.method != "none":
    raise InputError("--load reads an already quantized checkpoint; use --model to quantize again")
  if args.method == "llm_int8":
    _validate_llm_int8(args)
  if args.method == "zeroquant":
    _validate_zeroquant(args)
  if not needs_calibration(args):
    return
  if args.static_groups and args.groupsize <= 0:
    raise InputError("--static-groups needs groups (--groupsize > 0)")
  if args.nsamples < 1:
    raise InputError(f"--nsamples must be positive, got {args.nsamples}")
  if args.calib_seqlen is not None and args.calib_seqlen < 2:
    raise InputError(f"--calib-seqlen must be at least 2, got {args.calib_seqlen}")
  if not args.percdamp > 0:
    raise InputError(f"--percdamp must be positive, got {args.percdamp}")
  if args.block_size < 1:
    raise InputError(f"--block-size must be positive, got {args.block_size}")
  if args.calib_text:
    if not Path(args.calib_text).is_file():
      raise InputError(f"--calib-text file {args.calib_text} does not exist")
  else:
    assets.named_text(args.calib_dataset, assets.CALIB_DATASETS)
  if args.method == "awq" and args.awq_grid < 1:
    raise InputError(f"--awq-grid must be positive, got {args.awq_grid}")
  if args.method == "spqr":
    for flag in ("qq_scale_bits", "qq_zero_bits"):
      if not 1 <= getattr(args, flag) <= 8:
        raise InputError(f"--{flag.replace('_', '-')} must be between 1 and 8, got {getattr(args, flag)}")
    if args.groupsize <= 0:
      raise InputError("SpQR needs groups (--groupsize > 0)")
    if args.qq_groupsize < 1:
      raise InputError(f"--qq-groupsize must be positive, got {args.qq_groupsize}")
    if not args.outlier_threshold > 0:
      raise InputError(f"--outlier-threshold must be positive, got {args.outlier_threshold}")


def _validate_zeroquant(args):
  if not 2 <= args.zq_attn_bits <= 8:
    raise InputError(f"--zq-attn-bits must be between 2 and 8, got {args.zq_attn_bits}")
  if args.lkd_steps < 1 or args.lkd_batch < 1:
    raise InputError("--lkd-steps and --lkd-batch must be positive")
  if not args.lkd_lr > 0:
    raise InputError(f"--lkd-lr must be positive, got {args.lkd_lr}")
  if args.lkd_layers is not None:
    _layer_indices(args.lkd_layers)


def _validate_llm_int8(args):
  if not args.int8_threshold > 0:
    raise InputError(f"--int8-threshold must be positive, got {args.int8_threshold}")


def config(args):
  """The method's frozen config dataclass (None for ``--method none``)."""
  common = dict(bits=args.wbits, group_size=args.groupsize)
  if args.method == "rtn":
    return rtn.RTNConfig(**common, sym=args.sym)
  if args.method == "gptq":
    return gptq.GPTQConfig(**common, sym=args.sym, act_order=args.act_order, static_groups=args.static_groups,
                           percdamp=args.percdamp, block_size=args.block_size, true_sequential=args.true_sequential)
  if args.method == "spqr":
    return spqr.SpQRConfig(**common, sym=args.sym, qq_scale_bits=args.qq_scale_bits, qq_zero_bits=args.qq_zero_bits,
                           qq_groupsize=args.qq_groupsize, outlier_threshold=args.outlier_threshold,
                           act_order=args.act_order, percdamp=args.percdamp,
                           simplified_outliers=args.simplified_outliers, true_sequential=args.true_sequential,
                           block_size=args.block_size)
  if args.method == "zeroquant":
    layers = None if args.lkd_layers is None else tuple(_layer_indices(args.lkd_layers))
    return zeroquant.ZeroQuantConfig(bits_attn=args.zq_attn_bits, bits_mlp=args.wbits, group_size=args.groupsize,
                                     abits=args.abits, lkd=args.zq_lkd, lkd_steps=args.lkd_steps,
                                     lkd_lr=args.lkd_lr, lkd_batch=args.lkd_batch, lkd_layers=layers, seed=args.seed)
  if args.method == "awq":
    return awq.AWQConfig(**common, sym=args.sym, n_grid=args.awq_grid, clip=not args.no_awq_clip)
  if args.method == "llm_int8":
    return llm_int8.LLMInt8Config(threshold=args.int8_threshold)
  return None


def _layer_indices(text: str) -> list[int]:
  try:
    return [int(t) for t in text.split(",")]
  except ValueError:
    raise InputError(f"--lkd-layers must be comma-separated integers, got {text!r}") from None


def validate_for_model(args, model, params, cfg):
  """Checks that need the architecture (still before any long work)."""
  if args.method == "awq" or getattr(args, "smoothquant", False) or getattr(args, "plant_outliers", 0):
    scaling.check_foldable(model.config)
  if args.method == "zeroquant":
    cfg.distilled(model.config.num_layers)
  if cfg is not None and getattr(cfg, "group_size", -1) > 0:
    flat = tree.flatten(params)
    widths = {flat[p].shape[1] for p in tree.matching(params, cfg.targets)}
    narrow = sorted(w for w in widths if w < cfg.group_size)
    if narrow:
      raise InputError(f"--groupsize {cfg.group_size} is wider than the input width {narrow[0]} of some linears "
                       f"(input widths: {', '.join(map(str, sorted(widths)))}): such a group would span the whole "
                       f"row, i.e. per channel; use --groupsize -1 (per channel) or at most {narrow[0]}")
  if args.method == "spqr":  # the library handles a partial last row group; the CLI keeps the reference's rule
    flat = tree.flatten(params)
    for p in tree.matching(params, cfg.targets):
      out = flat[p].shape[0]
      if out % args.qq_groupsize:
        raise InputError(f"--qq-groupsize {args.qq_groupsize} does not divide the output width {out} of {p}")


def calibration_data(args, model, tokenizer, seed: int) -> Calibration:
  seqlen = args.calib_seqlen or min(2048, model.config.max_position_embeddings)
  if seqlen > model.config.max_position_embeddings:
    raise InputError(f"--calib-seqlen {seqlen} exceeds the model context ({model.config.max_position_embeddings})")
  path = args.calib_text or assets.named_text(args.calib_dataset, assets.CALIB_DATASETS)
  tokens = data.tokenize(tokenizer, data.read_text(path))
  if len(tokens) < seqlen + 1:
    default = min(2048, model.config.max_position_embeddings)
    raise InputError(f"calibration text {path} has {len(tokens)} tokens, fewer than one window of --calib-seqlen "
                     f"{seqlen} (+1) (default {default}, the model context capped at 2048): give a longer "
                     f"--calib-text or a smaller --calib-seqlen")
  return calibration_windows(model, tokens, args.nsamples, seqlen, seed)
