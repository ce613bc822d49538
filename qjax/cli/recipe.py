"""The quantization recipe shared by the command-line entry points (``qjax.quantize``, ``qjax.generate``): one
set of flags (:mod:`qjax.cli.weights` for weights, :mod:`qjax.cli.activations` for activations), one validation, and the
transforms in a fixed order::

    plant outliers -> SmoothQuant -> weight method -> int8 weights -> activation-quantizer hooks

Every step is a pure ``params -> params`` transform; the result keeps the prepared float parameters (outliers
planted, if asked) as the baseline to compare against.
"""
from __future__ import annotations

import argparse
import dataclasses

from qjax import api
from qjax.cli import activations as act_cli
from qjax.cli import common as cli
from qjax.cli import kv as kv_cli
from qjax.cli import weights as method_cli
from qjax.core.errors import InputError
from qjax.io import checkpoint
from qjax.methods.activations import smoothquant
from qjax.methods.activations.quantizers import ActQuantConfig
from qjax.methods.kv import kvquant
from qjax.models import CausalLM


def add_args(p: argparse.ArgumentParser):
  r = p.add_argument_group("recipe")
  r.add_argument("--recipe", metavar="FILE",
                 help="a recipe file (YAML or JSON; see README) instead of the weight, activation, KV, SmoothQuant and "
                      "outlier flags (the calibration flags still apply)")
  r.add_argument("--save-recipe", metavar="FILE", help="also write this run's recipe (YAML for .yaml/.yml, else JSON)")
  method_cli.add_args(p)
  act_cli.add_args(p)
  kv_cli.add_args(p)


_CALIBRATION_FLAGS = ("calib_text", "calib_dataset", "nsamples", "calib_seqlen")


def _recipe_flags(args) -> set[str]:
  """The flags a ``--recipe`` file replaces: every weight, activation and KV flag."""
  dests = {"method", "abits", "act_groupsize", "quantize_attention_matmuls", "int8_kernel", "smoothquant",
           "plant_outliers", "kv_method"}
  for dests_, _, _ in [*method_cli.scopes(args, None), *act_cli.scopes(args), *kv_cli.scopes(args)]:
    dests.update(dests_)
  return dests - set(_CALIBRATION_FLAGS)


def validate(args, given: frozenset[str], model_config=None):
  """Checks that need no weights (``model_config``: the architecture, read from ``config.json`` when the source
  has one): every flag's value, and that no flag the user set would be ignored (``given``: the flags set, from
  :func:`qjax.cli.common.given_flags`)."""
  if args.save_recipe:
    checkpoint.check_destination(args.save_recipe, getattr(args, "overwrite", False), "--save-recipe file")
  if args.recipe:
    clash = sorted(cli.flag(d) for d in _recipe_flags(args) & given)
    if clash:
      raise InputError(f"--recipe replaces {', '.join(clash)}: set them in the recipe file instead")
    if getattr(args, "load", None):
      raise InputError("--recipe quantizes a float model: use --model, not --load")
    rec = api.load_recipe(args.recipe)
    calibrates = rec.needs_calibration or isinstance(rec.kv, kvquant.KVQuantConfig)
    cli.check_scopes(given, [(_CALIBRATION_FLAGS, calibrates, "a recipe that calibrates")])
    return
  cfg = method_cli.config(args, given)
  cli.check_scopes(given, [*method_cli.scopes(args, cfg), *act_cli.scopes(args), *kv_cli.scopes(args)])
  method_cli.validate(args, cfg)
  act_cli.validate(args, cfg)
  kv_cli.validate(args, given, model_config.head_dim if model_config is not None else None)


@dataclasses.dataclass
class Run:
  """What the CLI quantized: the library's :class:`qjax.api.Quantized` plus the CLI's bookkeeping."""
  q: api.Quantized
  act: ActQuantConfig
  method: dict                     # what ran, as saved with a checkpoint
  calibration: object              # Calibration or None
  loaded: str | None = None        # "qjax checkpoint" / "HF GPTQ checkpoint": quantized before this run

  model = property(lambda self: self.q.model)
  params = property(lambda self: self.q.params)
  float_model = property(lambda self: self.q.float_model)
  float_params = property(lambda self: self.q.float_params)
  kv = property(lambda self: self.q.kv)
  seconds = property(lambda self: self.q.seconds)
  compile_seconds = property(lambda self: self.q.compile_seconds)
  recipe = property(lambda self: self.q.recipe)
  report = property(lambda self: next((r for k, r in self.q.reports.items() if k != "smoothquant"), None))
  smooth_report = property(lambda self: self.q.reports.get("smoothquant"))

  @property
  def quantized(self) -> bool:
    return (self.method["name"] != "none" or self.act.enabled or self.recipe.smoothquant is not None
            or self.kv is not None)


def from_flags(args, given, model: CausalLM, meta: dict | None, kv_config=None) -> api.Recipe:
  """The Recipe the flags describe (``--recipe FILE`` instead when given); ``meta``: the loaded checkpoint's
  metadata (its activation quantizer is reused unless ``--abits`` is given)."""
  if args.recipe:
    return api.load_recipe(args.recipe)
  cfg = method_cli.config(args, given)
  act = act_cli.act_config(args, cfg, meta["method"].get("activation") if meta else None)
  recipe = api.Recipe(outliers=act_cli.outlier_config(args),
                      smoothquant=smoothquant.SmoothQuantConfig(args.alpha) if args.smoothquant else None,
                      weights=(api.Rule(model.family.linear_pattern, cfg),) if cfg is not None else (),
                      activations=act, kv=kv_config, int8_kernel=args.int8_kernel)
  return recipe


def apply(args, given: frozenset[str], model: CausalLM, params, meta: dict | None, tokenizer, progress: bool,
          kv_calibration=None) -> Run:
  """Runs the recipe the flags (or ``--recipe``) describe on ``(model, params)`` through
  :func:`qjax.api.quantize_model` (``meta``: the metadata of an already quantized source; ``kv_calibration``:
  a saved KVQuant calibration to reuse). KVQuant is calibrated on the float model the recipe starts from."""
  if meta is not None and meta.get("loaded") == "qjax checkpoint":
    kv_method, kv_cfg, kv_calibration = kv_cli.resolve_saved(args, given, meta["method"].get("kv_cache"),
                                                             kv_calibration)
  else:
    kv_method = args.kv_method or "none"
    kv_cfg = None if kv_method == "none" else kv_cli.config(kv_method, args, given)
  recipe = from_flags(args, given, model, meta, kv_cfg)
  method_cli.validate_for_model(model, params, recipe)
  calib = (method_cli.calibration_data(args, model, params, tokenizer, args.seed, progress)
           if recipe.needs_calibration else None)
  kv_data = None
  if isinstance(recipe.kv, kvquant.KVQuantConfig):
    kv_data = (kvquant.KVQuantCalibration.from_dict(kv_calibration) if kv_calibration is not None
               else kv_cli.calibration_windows(args, model, tokenizer, recipe.kv))
  q = api.quantize_model(model, params, recipe, calibration=calib, kv_calibration=kv_data, progress=progress,
                         seed=args.seed)
  act = recipe.activations or ActQuantConfig()
  if meta is None:
    method = api.method_record(q)
  else:
    method = {**meta["method"], "activation": dataclasses.asdict(act), "kv_cache": q.kv and q.kv.to_dict()}
  return Run(q, act, method, calib, meta.get("loaded") if meta else None)


def label(run: Run, args) -> str:
  """Short name of what ran, e.g. ``smoothquant+rtn W8A8``."""
  name = ("smoothquant+" if run.recipe.smoothquant is not None else "") + run.method["name"]
  bits = sorted({r.config.bits for r in run.recipe.weights if getattr(r.config, "bits", None)}, reverse=True)
  cfg = run.method.get("config") or {}
  if not bits:
    bits = [cfg["bits"]] if cfg.get("bits") else []
  w = "/".join(map(str, bits)) or (f"{cfg['bits_mlp']}/{cfg['bits_attn']}" if "bits_mlp" in cfg else "")
  wa = ((f"W{w}" if w else "") + (f"A{run.act.bits}" if run.act.bits < 16 else "")
        + (f"KV{run.act.kv_bits}" if run.act.kv_bits < 16 else ""))
  text = f"{name} {wa}" if wa else name
  text = text if run.kv is None else f"{text} + {run.kv.name} KV"
  return f"{text} (loaded)" if run.loaded else text
