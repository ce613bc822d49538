"""``quantize_model``: a :class:`~qjax.api.recipe.Recipe` applied to a model as one pure ``params -> params``
pipeline, and the frozen :class:`Quantized` result."""
from __future__ import annotations

import dataclasses
import math
import time

import jax

from qjax.api.recipe import Recipe, Rule
from qjax.api.rules import match_rules
from qjax.core import timing, tree
from qjax.core.errors import InputError
from qjax.core.formats import int8
from qjax.methods import registry
from qjax.methods.activations import smoothquant
from qjax.methods.activations.outliers import plant_outliers
from qjax.methods.activations.quantizers import ActQuantConfig
from qjax.methods.registry import KVCacheSetup
from qjax.models import CausalLM


@dataclasses.dataclass(frozen=True)
class RuleReport:
  """What one rule ended up quantizing: its weights and their stored bits per weight."""
  pattern: str
  method: str | None
  paths: tuple[str, ...]
  bits_per_weight: float | None    # stored bits / weights over ``paths`` (None: nothing or float)

  def to_dict(self) -> dict:
    return {"pattern": self.pattern, "method": self.method, "weights": len(self.paths),
            "bits_per_weight": self.bits_per_weight}


@dataclasses.dataclass(frozen=True)
class Quantized:
  """The result of :func:`quantize_model`: ``model`` carries the activation / KV hooks, ``params`` the quantized
  tree; ``float_model`` / ``float_params`` are what the recipe started from (outliers planted, if asked)."""
  model: CausalLM
  params: dict
  recipe: Recipe
  float_model: CausalLM
  float_params: dict
  rules: tuple[RuleReport, ...]
  reports: dict                     # {"smoothquant" | method name: CalibrationReport or None}
  kv: KVCacheSetup | None            # the cache of recipe.kv (None: dense)
  seconds: float                    # transforms, calibration data excluded
  compile_seconds: float = 0.0      # of which: tracing, lowering and XLA compilation


def quantize_model(model: CausalLM, params, recipe: Recipe, *, calibration=None, kv_calibration=None,
                   progress: bool = False, seed: int = 0) -> Quantized:
  """Applies ``recipe`` to the float ``(model, params)``: a pure transform (``params`` is not modified).

  ``calibration``: a :class:`qjax.calibration.Calibration` (windows, e.g. :func:`qjax.calibration_windows`) for
  SmoothQuant and calibrated weight methods; ``kv_calibration``: for a KVQuant cache, a fitted
  :class:`~qjax.methods.kv.kvquant.KVQuantCalibration` to reuse or a Calibration to fit one on (the float model);
  ``seed``: KVQuant's position sampling.
  """
  if recipe.needs_calibration and calibration is None:
    raise InputError("this recipe calibrates (SmoothQuant or a calibrated weight method): pass calibration=")
  t0 = time.perf_counter()
  with timing.compile_time() as compiled:
    float_params, qparams, reports, matched, kv = _apply(model, params, recipe, calibration, kv_calibration,
                                                         progress, seed)
  seconds = time.perf_counter() - t0
  act = recipe.activations or ActQuantConfig()
  hooks = act.hooks() if kv is None else dataclasses.replace(act.hooks(), kv_past=kv.past_hook)
  flat = tree.flatten(qparams)
  rules = tuple(_rule_report(flat, r, [p for p, m in matched.items() if m is r]) for r in recipe.weights)
  return Quantized(model.with_hooks(hooks), qparams, recipe, model, float_params, rules, reports, kv, seconds,
                   compiled.seconds)


def _apply(model, params, recipe: Recipe, calibration, kv_calibration, progress: bool, seed: int):
  """The transforms of :func:`quantize_model`: ``(float_params, qparams, reports, matched rules, kv setup)``."""
  float_params = plant_outliers(model, params, recipe.outliers) if recipe.outliers else params
  qparams, reports = float_params, {}
  if recipe.smoothquant is not None:
    qparams, reports["smoothquant"] = smoothquant.smooth(qparams, recipe.smoothquant, calibration, progress)
  matched = match_rules(qparams, recipe.weights)
  assignment = {p: r.config for p, r in matched.items() if r.config is not None}
  order = []
  for r in recipe.weights:
    if r.config is not None and type(r.config) not in order:
      order.append(type(r.config))
  for t in order:
    part = {p: c for p, c in assignment.items() if type(c) is t}
    if part:
      method = registry.method_for(t)
      qparams, reports[method.name] = method.handler(qparams, part, model=model, calibration=calibration,
                                                     progress=progress)
  if recipe.int8_kernel:
    qparams = int8.to_int8(qparams)
  jax.block_until_ready(qparams)
  kv = _kv_setup(model, float_params, recipe.kv, kv_calibration, progress, seed)
  return float_params, qparams, reports, matched, kv


def _rule_report(flat: dict, rule: Rule, paths) -> RuleReport:
  n = sum(flat[p].size for p in paths)
  bits = 8 * sum(flat[p].nbytes for p in paths) / n if n and rule.config is not None else None
  return RuleReport(rule.pattern, rule.method, tuple(sorted(paths)), bits)


def _kv_setup(model: CausalLM, float_params, cfg, kv_calibration, progress: bool, seed: int) -> KVCacheSetup | None:
  if cfg is None:
    return None
  return registry.kv_method_for(cfg).setup(model, float_params, cfg, kv_calibration, progress=progress, seed=seed)


def method_record(q: Quantized) -> dict:
  """What ran, as a checkpoint's ``method`` entry records it: weight method name(s) and the first weight
  config, the activation quantizer, SmoothQuant, planted outliers, int8 execution and the KV cache."""
  r = q.recipe
  configs = [x.config for x in r.weights if x.config is not None]
  names = list(dict.fromkeys(registry.method_for(c).name for c in configs))
  first = dataclasses.asdict(configs[0]) if configs else {}
  first = {k: (None if isinstance(v, float) and math.isinf(v) else list(v) if isinstance(v, tuple) else v)
           for k, v in first.items()}
  return {"name": "+".join(names) or "none", "config": first,
          "activation": dataclasses.asdict(r.activations or ActQuantConfig()),
          "smoothquant": None if r.smoothquant is None else dataclasses.asdict(r.smoothquant),
          "outliers": None if r.outliers is None else dataclasses.asdict(r.outliers),
          "int8_kernel": r.int8_kernel, "kv_cache": None if q.kv is None else q.kv.to_dict()}
