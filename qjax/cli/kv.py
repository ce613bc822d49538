"""Command-line wiring of KV-cache quantization (KIVI, KVQuant), shared by ``qjax.quantize`` (perplexity under a
quantized cache) and ``qjax.generate`` (decoding through it): flags -> configs, the reuse of a checkpoint's saved
cache, KVQuant's calibration windows. The cache itself is built by :func:`qjax.api.quantize_model`
(:class:`qjax.methods.registry.KVCacheSetup`).
"""
from __future__ import annotations

import argparse
import dataclasses

import jax.numpy as jnp

from qjax import calibration
from qjax.cli import common as cli
from qjax.cli import options
from qjax.core.errors import InputError
from qjax.evaluation.generation import cache_bytes_per_token
from qjax.io import text as data
from qjax.methods import registry
from qjax.methods.kv import kivi, kvquant
from qjax.models import CausalLM
from qjax.models.kv_cache import KVCache


def _configs() -> dict[str, type]:
  """``{method name: config type}`` of every registered KV-cache method."""
  return {name: m.config_type for name, m in registry.kv_methods().items()}


def add_args(p: argparse.ArgumentParser):
  g = p.add_argument_group("KV-cache quantization")
  g.add_argument("--kv-method", choices=("none", *registry.kv_methods()),
                 help="quantized KV cache (default none; with --load: the one the checkpoint was saved with)")
  options.add_flags(p, _configs(), "--kv-method")


def scopes(args):
  """``(flags, applies, needs)`` for :func:`qjax.cli.common.check_scopes`."""
  return options.scopes(_configs(), args.kv_method, None, "--kv-method")


def validate(args, given: frozenset[str], head_dim: int | None = None):
  """Checks that need no weights (``head_dim`` from the model's config): KIVI's group size against ``head_dim``
  (first: the most direct message), then the config's own checks."""
  if args.kv_method in (None, "none"):
    return
  if args.kv_method == "kivi" and head_dim is not None:
    group = options.given_values(kivi.KIVIConfig, args, given).get("group_size", kivi.KIVIConfig.group_size)
    if group > 0 and head_dim % group:
      raise InputError(f"KIVI --kv-group-size {group} must divide head_dim {head_dim} (value groups are channels "
                       f"of one head)")
  config(args.kv_method, args, given)


def config(method: str, args, given: frozenset[str]):
  """The frozen config of KV method ``method`` from the flags given."""
  return options.build(registry.kv_methods()[method].config_type, args, given)


def resolve_saved(args, given, saved: dict | None, kv_calibration: dict | None):
  """With ``--load``: the KV setup to build, ``(method, config or None, calibration dict or None)``.

  No ``--kv-method``: what the checkpoint was saved with (``saved``: its ``method["kv_cache"]``), or dense.
  ``--kv-method kivi``: the flags over the saved KIVI settings. ``--kv-method kvquant``: the saved calibration
  (flags that contradict it are refused: a new calibration needs the float model); without one, refused."""
  method = args.kv_method
  saved_name = (saved or {}).get("name", "")
  saved_method = saved_name.split("-")[0] if saved_name else "none"
  if method is None:
    method = saved_method
  if method == "none":
    return "none", None, None
  if method == "kivi":
    if saved_method != "kivi":
      return "kivi", config("kivi", args, given), None
    flags = options.given_values(kivi.KIVIConfig, args, given)
    return "kivi", dataclasses.replace(kivi.KIVIConfig(**saved["config"]), **flags), None
  if kv_calibration is None:
    raise InputError("KVQuant calibrates on the float model and this checkpoint holds no KVQuant calibration: run "
                     "--kv-method kvquant with --model (then --save keeps the calibration with the checkpoint)")
  saved_cfg = kvquant.KVQuantCalibration.from_dict(kv_calibration).config
  wanted = dataclasses.replace(saved_cfg, **options.given_values(kvquant.KVQuantConfig, args, given))
  if wanted != saved_cfg:
    diff = ", ".join(f"{f} {getattr(saved_cfg, f)} -> {getattr(wanted, f)}" for f in
                     (f.name for f in dataclasses.fields(saved_cfg)) if getattr(saved_cfg, f) != getattr(wanted, f))
    raise InputError(f"this checkpoint's KVQuant calibration is kvquant-{saved_cfg.bits} and the flags ask for "
                     f"{diff}: a new calibration needs the float model (use --model), or drop those flags to reuse "
                     f"the saved one")
  return "kvquant", saved_cfg, kv_calibration


def calibration_windows(args, model: CausalLM, tokenizer, cfg: kvquant.KVQuantConfig):
  """KVQuant's calibration windows: ``cfg.nsamples`` seeded windows of the calibration text
  (:func:`qjax.cli.common.calibration_text`)."""
  path = cli.calibration_text(args)
  tokens = data.tokenize(tokenizer, data.read_text(path))
  return calibration.calibration_windows(model, tokens, cfg.nsamples, cfg.seqlen, args.seed)


def bytes_per_token(kv, model: CausalLM, max_len: int) -> dict:
  """Measured stored bytes per cached token of a one-row cache of ``max_len`` slots, and of the dense cache."""
  dtype = jnp.dtype(model.dtype)
  return {"bytes_per_token": cache_bytes_per_token(kv.cache_factory(model.config, 1, max_len, dtype)),
          "dense_bytes_per_token": cache_bytes_per_token(KVCache.dense(model.config, 1, max_len, dtype)),
          "max_len": max_len}
