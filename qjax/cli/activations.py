"""Command-line wiring of activation quantization, SmoothQuant, the int8 execution path and the outlier test bed
(shared by the entry points that quantize, like :mod:`qjax.cli.weights` for weights).

Order of a run: plant outliers (``--plant-outliers``, function-preserving) -> SmoothQuant (``--smoothquant``,
function-preserving) -> weight method -> int8 weights (``--int8-kernel``) -> evaluation with the activation
quantizer hooks (``--abits``).
"""
from __future__ import annotations

import argparse

from qjax.core.errors import InputError
from qjax.methods.activations.outliers import OutlierConfig
from qjax.methods.activations.quantizers import ActQuantConfig


def add_args(p: argparse.ArgumentParser):
  a = p.add_argument_group("activation quantization")
  a.add_argument("--abits", type=int, default=16, help="activation bits, 2..8 (16 = off, the default)")
  sym = a.add_mutually_exclusive_group()
  sym.add_argument("--asym", dest="sym_act", action="store_false", help="asymmetric activations (default)")
  sym.add_argument("--sym-act", dest="sym_act", action="store_true", help="symmetric activations")
  p.set_defaults(sym_act=False)
  a.add_argument("--act-groupsize", type=int, default=-1,
                 help="channels per activation range for linear inputs; -1 = per token (default)")
  a.add_argument("--quantize-attention-matmuls", action="store_true",
                 help="also quantize the operands of Q K^T and P V (per token / per query row)")
  a.add_argument("--int8-kernel", action="store_true",
                 help="run 8-bit per-channel weights x 8-bit per-token activations as int8 x int8 -> int32")
  s = p.add_argument_group("SmoothQuant (uses the calibration flags)")
  s.add_argument("--smoothquant", action="store_true", help="smooth activation outliers into the weights first")
  s.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
  o = p.add_argument_group("outlier test bed")
  o.add_argument("--plant-outliers", type=int, default=0, metavar="N",
                 help="plant N outlier channels in every attention norm (function-preserving) before quantizing")
  o.add_argument("--outlier-factor", type=float, default=50.0, help="magnitude of planted outliers (default 50)")
  o.add_argument("--outlier-norms", default="attention", choices=("attention", "all"),
                 help="plant in the attention norms (default) or every norm feeding linears")


def scopes(args):
  """``(flags, applies, needs)`` for :func:`qjax.cli.common.check_scopes`."""
  return [(("sym_act",), args.abits != 16, "--abits below 16"),
          (("alpha",), args.smoothquant, "--smoothquant"),
          (("outlier_factor", "outlier_norms"), args.plant_outliers > 0, "--plant-outliers N")]


def validate(args, weight_config=None):
  """Checks that need no model (``weight_config``: the weight method's config the flags built)."""
  if args.smoothquant and args.method == "none" and args.abits == 16:
    raise InputError("--smoothquant alone only rescales the model (function-preserving, the same outputs): combine "
                     "it with a weight method (--method) and/or activation bits (--abits)")
  if args.abits != 16 and not 2 <= args.abits <= 8:
    raise InputError(f"--abits must be between 2 and 8 (or 16 for none), got {args.abits}")
  if args.act_groupsize == 0 or args.act_groupsize < -1:
    raise InputError(f"--act-groupsize must be -1 (per token) or positive, got {args.act_groupsize}")
  if args.abits == 16 and (args.act_groupsize != -1 or args.quantize_attention_matmuls):
    raise InputError("--act-groupsize / --quantize-attention-matmuls need --abits below 16")
  if args.int8_kernel:
    if args.abits != 8 or args.act_groupsize != -1:
      raise InputError("--int8-kernel needs --abits 8 with per-token ranges (--act-groupsize -1)")
    if args.method not in ("rtn", "gptq", "zeroquant"):
      raise InputError("--int8-kernel needs 8-bit weights from --method rtn, gptq or zeroquant")
    if args.method in ("rtn", "gptq") and (weight_config.bits != 8 or weight_config.group_size != -1):
      raise InputError("--int8-kernel needs --wbits 8 and per-channel weights (--groupsize -1)")
    if args.method == "gptq" and weight_config.act_order:
      raise InputError("--int8-kernel needs weights in natural column order (no --act-order)")
  if args.method == "zeroquant" and (args.act_groupsize != -1 or args.quantize_attention_matmuls or args.sym_act):
    raise InputError("ZeroQuant quantizes linear inputs per token with symmetric absmax levels: drop "
                     "--act-groupsize / --quantize-attention-matmuls / --sym-act")
  if args.method == "llm_int8" and args.abits != 16:
    raise InputError("LLM.int8 quantizes its own activations: drop --abits")
  if args.smoothquant and not 0 <= args.alpha <= 1:
    raise InputError(f"--alpha must be in [0, 1], got {args.alpha}")
  if args.plant_outliers < 0:
    raise InputError(f"--plant-outliers must be non-negative, got {args.plant_outliers}")
  if args.plant_outliers and not args.outlier_factor > 0:
    raise InputError(f"--outlier-factor must be positive, got {args.outlier_factor}")
  if getattr(args, "load", None) and (args.smoothquant or args.plant_outliers):
    raise InputError("--smoothquant / --plant-outliers transform a float model: use --model, not --load")


def act_config(args, method_config=None, saved: dict | None = None) -> ActQuantConfig:
  """The activation quantizer: from the flags, or the one saved with a loaded checkpoint when ``--abits`` is not
  given. A method that trains with its own activation quantizers runs with them (its config's ``act_config``:
  ZeroQuant's DeepSpeed symmetric absmax levels per token, LLM-QAT's activation and KV-cache bits)."""
  if args.abits == 16 and saved:
    return ActQuantConfig(**saved)
  if hasattr(method_config, "act_config"):   # methods that train with their own quantizers (ZeroQuant, LLM-QAT)
    return method_config.act_config()
  return ActQuantConfig(bits=args.abits, sym=args.sym_act, group_size=args.act_groupsize,
                        attention_matmuls=args.quantize_attention_matmuls)


def outlier_config(args) -> OutlierConfig | None:
  if not args.plant_outliers:
    return None
  return OutlierConfig(args.plant_outliers, args.outlier_factor, args.outlier_norms, args.seed)


def describe(act: ActQuantConfig, method: str = "none") -> str:
  """One line for the summary, e.g. ``8-bit per-token asym, dynamic; + attention matmuls``."""
  if method == "llm_int8":
    return ("LLM.int8 decomposition: input columns with any |x| >= threshold in float, the rest 8-bit "
            "per-token absmax (int8 x int8)")
  if not act.enabled:
    return "float (not quantized)"
  ranges = "per-token" if act.group_size == -1 else f"per {act.group_size} channels"
  kind = "sym absmax" if act.scheme == "absmax" else "sym" if act.sym else "asym"
  kv = f"KV cache {act.kv_bits}-bit per token {kind}" if act.kv_bits < 16 else ""
  if act.bits == 16:
    return f"linear inputs float; {kv}"
  return (f"{act.bits}-bit {ranges} {kind}, dynamic" + ("; + attention matmuls" if act.attention_matmuls else "")
          + (f"; {kv}" if kv else ""))
