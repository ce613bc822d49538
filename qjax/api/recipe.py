"""The composable quantization API: a :class:`Recipe` of per-path :class:`Rule` s plus activation, KV-cache,
SmoothQuant and outlier settings, applied by :func:`quantize_model` as one pure ``params -> params`` pipeline::

    plant outliers -> SmoothQuant -> weight methods (rule order) -> int8 weights -> activation / KV hooks

Example: GPTQ W3 g32 with act-order on the MLP linears, GPTQ W4 per channel on attention, RTN W8 on ``lm_head``::

    recipe = qjax.Recipe(weights=(
        qjax.Rule(r".*/mlp/.*", GPTQConfig(bits=3, group_size=32, act_order=True, static_groups=True)),
        qjax.Rule(r".*/self_attn/.*", GPTQConfig(bits=4, act_order=True)),
        qjax.Rule(r"lm_head/weight", RTNConfig(bits=8))))
    q = qjax.quantize_model(model, params, recipe, calibration=qjax.calibration_windows(model, tokens, 128, 2048))

A weight parameter (a 2-D ``.../weight`` leaf: every linear and ``lm_head``) takes the config of the FIRST rule
whose regex fully matches its path (``config=None``: stays float); unmatched weights stay float. Weight methods
run in the order their config types first appear among the rules, each through its registered handler
(:mod:`qjax.methods.registry`), so a later calibrated method sees the earlier ones' quantized layers. Recipes
serialize to versioned dicts (:meth:`Recipe.to_dict`, :meth:`Recipe.from_dict`) and YAML / JSON files
(:func:`load_recipe`, :func:`save_recipe`) that name only qjax's own config classes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from pathlib import Path

from qjax.core.errors import InputError
from qjax.methods import registry
from qjax.methods.activations import smoothquant
from qjax.methods.activations.outliers import OutlierConfig
from qjax.methods.activations.quantizers import ActQuantConfig
from qjax.methods.kv import kivi, kvquant

RECIPE_TYPE, RECIPE_VERSION = "qjax.Recipe", 1
_SECTIONS = {"outliers": OutlierConfig, "smoothquant": smoothquant.SmoothQuantConfig,
             "activations": ActQuantConfig}


@dataclasses.dataclass(frozen=True)
class Rule:
  """``pattern``: a regex that must FULLY match a parameter path (``model/layers_3/mlp/down_proj/weight``);
  ``config``: a registered weight method's config, or None to keep the matched weights float."""
  pattern: str
  config: object | None = None

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise InputError(f"rule pattern {self.pattern!r} is not a regular expression: {e}") from None
    if self.config is not None:
      registry.method_for(self.config)

  @property
  def method(self) -> str | None:
    return None if self.config is None else registry.method_for(self.config).name


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
  """What to do to a float model (every field optional). ``weights``: ordered rules (see the module docstring);
  ``activations``: dynamic activation quantization (``bits < 16``); ``kv``: a KIVI or KVQuant cache config;
  ``int8_kernel``: run 8-bit per-channel weights as real int8 matmuls (needs 8-bit per-token activations)."""
  outliers: OutlierConfig | None = None
  smoothquant: smoothquant.SmoothQuantConfig | None = None
  weights: tuple[Rule, ...] = ()
  activations: ActQuantConfig | None = None
  kv: kivi.KIVIConfig | kvquant.KVQuantConfig | None = None
  int8_kernel: bool = False

  def __post_init__(self):
    object.__setattr__(self, "weights", tuple(self.weights))
    for name, cls in _SECTIONS.items():
      v = getattr(self, name)
      if v is not None and not isinstance(v, cls):
        raise InputError(f"Recipe.{name} must be a {cls.__name__} or None, got {type(v).__name__}")
    if not all(isinstance(r, Rule) for r in self.weights):
      raise InputError("Recipe.weights must be a sequence of Rule")
    if self.kv is not None:
      registry.kv_method_for(self.kv)
    acts = self.activations is not None and self.activations.enabled
    if self.smoothquant is not None and not acts and not any(r.config is not None for r in self.weights):
      raise InputError("SmoothQuant alone only rescales the model (function-preserving, the same outputs): combine "
                       "it with weight rules and/or activation bits")
    if self.int8_kernel and not (acts and self.activations.bits == 8 and self.activations.group_size == -1):
      raise InputError("int8_kernel needs 8-bit per-token activations")

  @property
  def needs_calibration(self) -> bool:
    """Whether :func:`quantize_model` needs calibration windows (SmoothQuant or a calibrated weight method)."""
    return self.smoothquant is not None or any(
        r.config is not None and registry.method_for(r.config).needs_calibration(r.config) for r in self.weights)

  def to_dict(self) -> dict:
    """A versioned, JSON-able description (:meth:`from_dict` reads it back)."""
    d = {"type": RECIPE_TYPE, "version": RECIPE_VERSION}
    for name in _SECTIONS:
      v = getattr(self, name)
      d[name] = None if v is None else _config_dict(v)
    d["weights"] = [{"pattern": r.pattern, "method": r.method,
                     "config": None if r.config is None else _config_dict(r.config)} for r in self.weights]
    d["kv"] = None if self.kv is None else {"method": registry.kv_method_for(self.kv).name,
                                            "config": _config_dict(self.kv)}
    d["int8_kernel"] = self.int8_kernel
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "Recipe":
    """The recipe of :meth:`to_dict`; config classes are resolved only among qjax's own (the registered weight
    methods, the KV methods and the section types), never imported by name."""
    if not isinstance(d, dict) or d.get("type") != RECIPE_TYPE:
      raise InputError(f"not a qjax recipe (its 'type' must be {RECIPE_TYPE!r})")
    if d.get("version") != RECIPE_VERSION:
      raise InputError(f"unsupported recipe version {d.get('version')!r} (this qjax reads {RECIPE_VERSION})")
    unknown = sorted(set(d) - {"type", "version", "weights", "kv", "int8_kernel", *_SECTIONS})
    if unknown:
      raise InputError(f"unknown recipe entries: {', '.join(unknown)}")
    kw = {name: None if d.get(name) is None else _config_from(cls_, d[name], name)
          for name, cls_ in _SECTIONS.items()}
    methods = registry.methods()
    rules = []
    for i, r in enumerate(d.get("weights") or ()):
      if not isinstance(r, dict) or "pattern" not in r:
        raise InputError(f"weights[{i}] must be a mapping with a 'pattern'")
      name = r.get("method")
      if name is None:
        rules.append(Rule(r["pattern"], None))
        continue
      if name not in methods:
        raise InputError(f"weights[{i}]: unknown method {name!r} (known: {', '.join(sorted(methods))})")
      rules.append(Rule(r["pattern"], _config_from(methods[name].config_type, r.get("config") or {},
                                                   f"weights[{i}]")))
    kv = d.get("kv")
    if kv is not None:
      known = registry.kv_methods()
      if not isinstance(kv, dict) or kv.get("method") not in known:
        raise InputError(f"kv.method must be one of {', '.join(sorted(known))}")
      kv = _config_from(known[kv["method"]].config_type, kv.get("config") or {}, "kv")
    return cls(**kw, weights=tuple(rules), kv=kv, int8_kernel=bool(d.get("int8_kernel", False)))


def _config_dict(cfg) -> dict:
  """A config's fields that differ from their defaults, JSON-able (tuples as lists, infinities as "inf", a
  nested config such as a QAT method's ``train`` as its own dict); ``targets`` is left out (a recipe's rules
  decide the paths)."""
  def enc(v):
    if dataclasses.is_dataclass(v):
      return _config_dict(v)
    if isinstance(v, float) and math.isinf(v):
      return "inf" if v > 0 else "-inf"
    return list(v) if isinstance(v, tuple) else v
  return {f.name: enc(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
          if f.name != "targets" and (f.default is dataclasses.MISSING or getattr(cfg, f.name) != f.default)}


def _config_from(cls, d, where: str):
  if not isinstance(d, dict):
    raise InputError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(d).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise InputError(f"{where}: {cls.__name__} has no field {unknown[0]!r} (fields: {', '.join(fields)})")
  hints = typing.get_type_hints(cls)
  kw = {}
  for k, v in d.items():
    hint = str(hints.get(k, ""))
    if dataclasses.is_dataclass(hints.get(k)):
      v = _config_from(hints[k], v, f"{where}.{k}")
    elif isinstance(v, list) and "tuple" in hint:
      v = tuple(v)
    elif v in ("inf", "-inf") and "float" in hint:
      v = float(v)
    kw[k] = v
  try:
    return cls(**kw)
  except TypeError as e:
    raise InputError(f"{where}: {e}") from None


def load_recipe(path) -> Recipe:
  """A recipe from a YAML (``.yaml`` / ``.yml``) or JSON file."""
  path = Path(path)
  if not path.is_file():
    raise InputError(f"recipe file {path} does not exist")
  text = path.read_text(encoding="utf-8")
  try:
    if path.suffix in (".yaml", ".yml"):
      import yaml
      d = yaml.safe_load(text)
    else:
      d = json.loads(text)
  except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
    raise InputError(f"recipe file {path} cannot be parsed: {str(e).splitlines()[0]}") from None
  return Recipe.from_dict(d)


def dump_recipe(recipe: Recipe, path) -> str:
  """The text of ``recipe`` as YAML (``.yaml`` / ``.yml`` paths) or JSON (anything else)."""
  if Path(path).suffix in (".yaml", ".yml"):
    import yaml
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
  return json.dumps(recipe.to_dict(), indent=1) + "\n"
