"""The quantization recipe shared by the command-line entry points (``qjax.quantize``, ``qjax.generate``): one
set of flags (:mod:`qjax.method_cli` for weights, :mod:`qjax.act_cli` for activations), one validation, and the
transforms in a fixed order::

    plant outliers -> SmoothQuant -> weight method -> int8 weights -> activation-quantizer hooks

Every step is a pure ``params -> params`` transform; the result keeps the prepared float parameters (outliers
planted, if asked) as the baseline to compare against.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax

from qjax import act_cli, cli, kv_cli, method_cli
from qjax.act_quant import ActQuantConfig
from qjax.methods import smoothquant
from qjax.models import CausalLM


def add_args(p: argparse.ArgumentParser):
  method_cli.add_args(p)
  act_cli.add_args(p)
  kv_cli.add_args(p)


def validate(args, given: frozenset[str], model_config=None):
  """Checks that need no weights (``model_config``: the architecture, read from ``config.json`` when the source
  has one): every flag's value, and that no flag the user set would be ignored (``given``: the flags set, from
  :func:`qjax.cli.given_flags`)."""
  method_cli.resolve_defaults(args)
  cli.check_scopes(given, [*method_cli.scopes(args), *act_cli.scopes(args), *kv_cli.scopes(args)])
  method_cli.validate(args)
  act_cli.validate(args)
  kv_cli.validate(args, model_config.head_dim if model_config is not None else None)


@dataclasses.dataclass
class Quantized:
  model: CausalLM                  # with the activation-quantizer and quantized-past KV hooks
  params: dict                     # quantized
  float_model: CausalLM            # without hooks
  float_params: dict               # the float parameters the recipe started from (outliers planted, if asked)
  act: ActQuantConfig
  config: object                   # the weight method's config (None for none / --load)
  method: dict                     # what ran, as saved with a checkpoint
  calibration: object              # Calibration or None
  report: object                   # the weight method's CalibrationReport or None
  smooth_report: object            # SmoothQuant's CalibrationReport or None
  seconds: float                   # time of the transforms (calibration data excluded)
  kv: kv_cli.KVSetup | None = None  # the quantized KV cache (None: dense)
  loaded: str | None = None         # "qjax checkpoint" / "HF GPTQ checkpoint": quantized before this run

  @property
  def quantized(self) -> bool:
    return (self.method["name"] != "none" or self.act.enabled or bool(self.method.get("smoothquant"))
            or self.kv is not None)


def apply(args, given: frozenset[str], model: CausalLM, params, meta: dict | None, tokenizer, progress: bool,
          kv_calibration=None) -> Quantized:
  """Runs the recipe the flags describe on ``(model, params)`` (``meta``: the checkpoint metadata with
  ``--load``, whose saved activation quantizer is reused unless ``--abits`` is given; ``kv_calibration``: a
  saved KVQuant calibration to reuse). KVQuant is calibrated on the float model the recipe starts from."""
  cfg = method_cli.config(args)
  method_cli.validate_for_model(args, model, params, cfg)
  act = act_cli.act_config(args, cfg, meta["method"].get("activation") if meta else None)
  params = act_cli.prepare(args, model, params)
  calib = method_cli.calibration_data(args, model, tokenizer, args.seed) if method_cli.needs_calibration(args) \
      else None
  t0 = time.perf_counter()
  qparams, smooth_report = params, None
  if args.smoothquant:
    qparams, smooth_report = smoothquant.smooth_with_report(qparams, smoothquant.SmoothQuantConfig(args.alpha), calib,
                                                            progress=progress)
  qparams, report = method_cli.run(args, cfg, model, qparams, calib, progress)
  if args.int8_kernel:
    qparams = act_cli.to_int8(qparams)
  jax.block_until_ready(qparams)
  if meta is not None and meta.get("loaded") == "qjax checkpoint":
    kv_method, kv_cfg, kv_calibration = kv_cli.resolve_saved(args, given, meta["method"].get("kv_cache"),
                                                             kv_calibration)
  else:
    kv_method = args.kv_method or "none"
    kv_cfg = None if kv_method == "none" else kv_cli.config(kv_method, args.kv_bits, args)
  kv = kv_cli.setup(kv_method, kv_cfg, args, model, params, tokenizer, progress, kv_calibration)
  seconds = time.perf_counter() - t0  # KVQuant's calibration counts as quantization time
  method = ({"name": args.method, "config": method_cli.config_dict(cfg), **act_cli.config_dict(act, args)}
            if meta is None else {**meta["method"], "activation": dataclasses.asdict(act)})
  method["kv_cache"] = kv_cli.config_dict(kv)
  hooks = act.hooks() if kv is None else dataclasses.replace(act.hooks(), kv_past=kv.past_hook)
  return Quantized(model.with_hooks(hooks), qparams, model, params, act, cfg, method, calib, report,
                   smooth_report, seconds, kv, meta.get("loaded") if meta else None)


def label(q: Quantized, args) -> str:
  """Short name of what ran, e.g. ``smoothquant+rtn W8A8``."""
  name = ("smoothquant+" if args.smoothquant else "") + q.method["name"]
  cfg = q.method.get("config") or {}
  bits = cfg.get("bits") or (f"{cfg['bits_mlp']}/{cfg['bits_attn']}" if "bits_mlp" in cfg else None)
  wa = (f"W{bits}" if bits else "") + (f"A{q.act.bits}" if q.act.enabled else "")
  label = f"{name} {wa}" if wa else name
  label = label if q.kv is None else f"{label} + {q.kv.name} KV"
  return f"{label} (loaded)" if q.loaded else label
