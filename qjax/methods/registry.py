"""The one registry of weight quantization methods: ``@register_method(ConfigType, name=...)`` on a handler with
the one signature every weight method shares::

    handler(params, rules, *, model=None, calibration=None, progress=True) -> (params, report)

``rules`` is either a config (quantize every still-dense weight its ``targets`` regexes match, the method's own
default) or a mapping ``{parameter path: config}`` (what a :class:`qjax.api.Recipe` resolves: mixed precision
within one method); :func:`as_assignment` turns either into the mapping. ``report`` is a
:class:`qjax.calibration.layerwise.CalibrationReport` for calibrated methods, a
:class:`qjax.calibration.training.TrainReport` for the quantization-aware ones (``qjax/methods/qat/``), else
``None``. The registry is filled when the
method modules are imported (:mod:`qjax.methods` imports them all) and never changes afterwards.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

from qjax.core import tree
from qjax.core.errors import InputError
from qjax.core.formats.base import is_quantized
from qjax.core.progress import bar as progress_bar


@dataclasses.dataclass(frozen=True)
class Method:
  name: str                      # e.g. "gptq": the CLI's --method and the recipe files' "method"
  config_type: type
  handler: Callable
  needs_calibration: Callable    # config -> bool (ZeroQuant needs calibration only with LKD)
  mixed: bool                    # whether one run may hold several different configs
  decoder_only: bool             # whether it quantizes decoder-layer linears only (layer-wise methods)
  streams: bool = False          # whether its handler only walks the layers (Calibration.walk): it may stream


_METHODS: dict[type, Method] = {}


def register_method(config_type: type, *, name: str, needs_calibration=False, mixed: bool = True,
                    decoder_only: bool = True, streams: bool = False):
  """Class-of-config -> handler registration (see the module docstring). ``needs_calibration``: a bool or a
  predicate of the config; ``mixed=False``: every path of one run must share one config (e.g. AWQ, whose scale
  search spans the linears that read one input); ``decoder_only=False``: any 2-D weight (e.g. ``lm_head``)."""
  predicate = needs_calibration if callable(needs_calibration) else (lambda cfg, v=bool(needs_calibration): v)

  def deco(fn):
    if config_type in _METHODS:
      raise ValueError(f"{config_type.__name__} is already registered to {_METHODS[config_type].name}")
    _METHODS[config_type] = Method(name, config_type, fn, predicate, mixed, decoder_only, streams)
    return fn

  return deco


def _registered(table: dict, config, what: str):
  t = config if isinstance(config, type) else type(config)
  if t not in table:
    raise InputError(f"{t.__name__} is not a registered {what} config "
                     f"(known: {', '.join(sorted(m.config_type.__name__ for m in table.values()))})")
  return table[t]


def method_for(config) -> Method:
  """The registered method of a config instance (or config type)."""
  return _registered(_METHODS, config, "weight quantization")


def methods() -> dict[str, Method]:
  """``{name: Method}`` of every registered weight method."""
  return {m.name: m for m in _METHODS.values()}


def as_assignment(params, rules) -> dict[str, object]:
  """``{path: config}``: ``rules`` itself when it is a mapping, else every still-dense weight matching the
  config's ``targets``. Raises InputError for a path that is not in ``params`` or a run that mixes configs of a
  method registered with ``mixed=False``."""
  flat = tree.flatten(params)
  if isinstance(rules, Mapping):
    assignment = dict(rules)
    missing = sorted(set(assignment) - set(flat))
    if missing:
      raise InputError(f"no parameter at {missing[0]}")
  else:
    assignment = {p: rules for p in tree.matching(params, rules.targets) if not is_quantized(flat[p])}
  configs = set(assignment.values())
  if len(configs) > 1 and not all(method_for(c).mixed for c in configs):
    raise InputError(f"{method_for(next(iter(configs))).name} runs one config per model: its rules must agree")
  return assignment


def shared(assignment: Mapping[str, object], field: str):
  """The value of a run-wide setting (``field`` of every config in ``assignment``), which must agree."""
  values = {getattr(c, field) for c in assignment.values()}
  if len(values) > 1:
    raise InputError(f"rules of one method disagree on {field} ({sorted(map(str, values))}): it applies to the "
                     f"whole run")
  return values.pop() if values else None


def exact_paths(assignment: Mapping[str, object]) -> tuple[str, ...]:
  """Regexes matching exactly the paths of ``assignment`` (for pipelines that take target regexes)."""
  return tuple(re.escape(p) for p in assignment)


def quantize_each(params, assignment: Mapping[str, object], quantize_weight, *, desc: str, progress: bool = True):
  """A new tree with every path of ``assignment`` replaced by ``quantize_weight(w, config)`` (the calibration-free
  methods' model-level loop)."""
  bar = progress_bar(total=len(assignment), desc=desc, enabled=progress)
  out = tree.replace(params, list(assignment), lambda p, w: (bar.update(), quantize_weight(w, assignment[p]))[1])
  bar.close()
  return out


# ---------------------------------------------------------------------------------------- KV-cache methods

@dataclasses.dataclass(frozen=True)
class KVCacheSetup:
  """A quantized KV cache ready to use (what a KV method's ``setup`` returns): the cache factory for generation,
  the quantized-past hook for cache-free evaluation, the closed-form stored bits per cached element, and the
  fitted calibration (KVQuant; saved with checkpoints) and the report of fitting it (``None`` when reused)."""
  name: str
  config: object
  cache_factory: Callable
  past_hook: Callable
  effective_bits: float
  calibration: object = None
  report: object = None

  def describe(self) -> str:
    return f"{self.name} ({self.effective_bits:.2f} bits per cached element)"

  def to_dict(self) -> dict:
    """What JSON outputs and checkpoints record."""
    return {"name": self.name, "config": dataclasses.asdict(self.config), "effective_bits": self.effective_bits}


@dataclasses.dataclass(frozen=True)
class KVMethod:
  name: str                      # "kivi", "kvquant": the CLI's --kv-method and the recipe files' kv.method
  config_type: type
  setup: Callable                # (model, float_params, config, calibration, *, progress, seed) -> KVCacheSetup
  needs_calibration: bool


_KV_METHODS: dict[type, KVMethod] = {}


def register_kv_method(config_type: type, *, name: str, needs_calibration: bool = False):
  """Registers a KV-cache method's ``setup`` (the one KV protocol: calibrate if needed, then the cache factory,
  the quantized-past hook, the effective bits). ``calibration`` is None, calibration windows to fit on, or an
  already fitted calibration of the method."""
  def deco(fn):
    _KV_METHODS[config_type] = KVMethod(name, config_type, fn, needs_calibration)
    return fn
  return deco


def kv_methods() -> dict[str, KVMethod]:
  """``{name: KVMethod}`` of every registered KV-cache method."""
  return {m.name: m for m in _KV_METHODS.values()}


def kv_method_for(config) -> KVMethod:
  """The registered KV-cache method of a config instance (or config type)."""
  return _registered(_KV_METHODS, config, "KV-cache")
