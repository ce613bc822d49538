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
import time
import typing
from pathlib import Path

import jax
import numpy as np

from qjax import calibration as calibration_lib
from qjax import int8, tree
from qjax.act_quant import ActQuantConfig
from qjax.errors import InputError
from qjax.methods import kivi, kvquant, registry, smoothquant
from qjax.models import CausalLM
from qjax.models.families import DECODER_LINEARS
from qjax.outliers import OutlierConfig, plant_outliers
from qjax.methods.registry import KVCacheSetup
from qjax.qarray import is_quantized

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
  """A config's fields that differ from their defaults, JSON-able (tuples as lists, infinities as "inf");
  ``targets`` is left out (a recipe's rules decide the paths)."""
  def enc(v):
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
    if isinstance(v, list) and "tuple" in hint:
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


# ------------------------------------------------------------------------------------------------ applying

def calibration_windows(model: CausalLM, tokens: np.ndarray, nsamples: int, seqlen: int,
                        seed: int = 0) -> calibration_lib.Calibration:
  """``nsamples`` seeded random windows of ``seqlen`` tokens of ``tokens`` (1-D ids) for ``model``."""
  from qjax import data
  calibration_lib.check_memory_budget(model, nsamples, seqlen)
  return calibration_lib.Calibration(model, data.calibration_windows(tokens, nsamples, seqlen, seed))


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


def weight_candidates(params) -> list[str]:
  """Paths a weight rule may quantize: every still-dense 2-D ``.../weight`` leaf except embeddings."""
  flat = tree.flatten(params)
  return [p for p, v in flat.items() if p.endswith("/weight") and not is_quantized(v) and np.ndim(v) == 2
          and "embed" not in p.rsplit("/", 2)[-2]]


def match_rules(params, rules: tuple[Rule, ...]) -> dict[str, Rule]:
  """``{path: rule}``: the FIRST fully matching rule of every weight a rule matches (module docstring). A rule
  that matches no weight is refused (a typo would otherwise silently quantize nothing), as is a decoder-only
  method on a weight outside the decoder layers."""
  candidates = weight_candidates(params)
  regs = [re.compile(r.pattern) for r in rules]
  matched = {}
  for p in candidates:
    i = next((i for i, rg in enumerate(regs) if rg.fullmatch(p)), None)
    if i is not None:
      matched[p] = rules[i]
  taken = {id(r) for r in matched.values()}
  for r in rules:
    if id(r) not in taken:
      raise InputError(f"rule {r.pattern!r} matches no weight that an earlier rule did not take (weights look like "
                       f"{candidates[0]!r})")
  decoder = [re.compile(p) for p in DECODER_LINEARS]
  for p, r in matched.items():
    if r.config is not None and registry.method_for(r.config).decoder_only and not any(
        d.fullmatch(p) for d in decoder):
      raise InputError(f"{r.method} quantizes decoder-layer linears only; {p} needs an RTN rule")
  return matched


def resolve_rules(params, rules: tuple[Rule, ...]) -> dict[str, object]:
  """``{path: config}`` of the weights that :func:`match_rules` gives a (non-None) config."""
  return {p: r.config for p, r in match_rules(params, rules).items() if r.config is not None}


def quantize_model(model: CausalLM, params, recipe: Recipe, *, calibration=None, kv_calibration=None,
                   progress: bool = False, seed: int = 0) -> Quantized:
  """Applies ``recipe`` to the float ``(model, params)``: a pure transform (``params`` is not modified).

  ``calibration``: a :class:`qjax.calibration.Calibration` (windows, e.g. :func:`calibration_windows`) for
  SmoothQuant and calibrated weight methods; ``kv_calibration``: for a KVQuant cache, a fitted
  :class:`~qjax.methods.kvquant.KVQuantCalibration` to reuse or a Calibration to fit one on (the float model);
  ``seed``: KVQuant's position sampling.
  """
  if recipe.needs_calibration and calibration is None:
    raise InputError("this recipe calibrates (SmoothQuant or a calibrated weight method): pass calibration=")
  t0 = time.perf_counter()
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
  seconds = time.perf_counter() - t0
  act = recipe.activations or ActQuantConfig()
  hooks = act.hooks() if kv is None else dataclasses.replace(act.hooks(), kv_past=kv.past_hook)
  flat = tree.flatten(qparams)
  rules = tuple(_rule_report(flat, r, [p for p, m in matched.items() if m is r]) for r in recipe.weights)
  return Quantized(model.with_hooks(hooks), qparams, recipe, model, float_params, rules, reports, kv, seconds)


def _rule_report(flat: dict, rule: Rule, paths) -> RuleReport:
  n = sum(flat[p].size for p in paths)
  bits = 8 * sum(flat[p].nbytes for p in paths) / n if n and rule.config is not None else None
  return RuleReport(rule.pattern, rule.method, tuple(sorted(paths)), bits)


def _kv_setup(model: CausalLM, float_params, cfg, kv_calibration, progress: bool, seed: int) -> KVCacheSetup | None:
  if cfg is None:
    return None
  return registry.kv_method_for(cfg).setup(model, float_params, cfg, kv_calibration, progress=progress, seed=seed)


# ------------------------------------------------------------------------------------------- load and save

@dataclasses.dataclass(frozen=True)
class Loaded:
  """What :func:`load` returns: the architecture, the parameters (float, or quantized for a checkpoint), the
  tokenizer, and for an already quantized source its metadata (``None`` for a float model)."""
  model: CausalLM
  params: dict
  tokenizer: object
  meta: dict | None = None

  @property
  def recipe(self) -> Recipe | None:
    """The recipe a qjax checkpoint was made with (None when it records none)."""
    d = (self.meta or {}).get("recipe")
    return None if d is None else Recipe.from_dict(d)


def load(path, dtype: str = "float32") -> Loaded:
  """A model folder: a qjax checkpoint (``qjax.json``: quantized tensors rebuilt from qjax's own types only), an
  HF folder (float safetensors, or an HF GPTQ checkpoint as QArrays)."""
  from qjax import checkpoint, data, hf_gptq, models
  path = Path(path)
  if (path / "qjax.json").is_file():
    meta = checkpoint.read_meta(path)
    model = CausalLM(models.ModelConfig.from_dir(path), meta["dtype"])
    params, meta = checkpoint.load_params(path)
    return Loaded(model, params, data.load_tokenizer(path), meta)
  model, params = models.load(path, dtype)
  qc = hf_gptq.quantization_config_of(path)
  meta = None if qc is None else {"method": {"name": "hf-gptq", "config": qc}}
  return Loaded(model, params, data.load_tokenizer(path), meta)


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


def save(q: Quantized, path, *, source_dir, overwrite: bool = False) -> Path:
  """Writes ``q`` as a qjax checkpoint (atomically; the recipe, and a KVQuant calibration, travel with it);
  ``source_dir``: the float model's folder (its config and tokenizer files are copied)."""
  from qjax import checkpoint
  return checkpoint.save(path, q.params, source_dir=source_dir, dtype=q.model.dtype, method=method_record(q),
                         overwrite=overwrite, recipe=q.recipe.to_dict(),
                         kv_calibration=q.kv.calibration.to_dict() if q.kv and q.kv.calibration else None)
