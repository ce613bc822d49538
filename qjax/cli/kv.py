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
from qjax.core.errors import InputError
from qjax.evaluation.generation import cache_bytes_per_token
from qjax.io import assets
from qjax.io import text as data
from qjax.methods.kv import kivi, kvquant
from qjax.models import CausalLM
from qjax.models.kv_cache import KVCache

KV_METHODS = ("none", "kivi", "kvquant")


def add_args(p: argparse.ArgumentParser):
  g = p.add_argument_group("KV-cache quantization")
  g.add_argument("--kv-method", choices=KV_METHODS,
                 help="quantized KV cache (default none; with --load: the one the checkpoint was saved with)")
  g.add_argument("--kv-bits", type=int, default=4, help="KV bits (KIVI 2..8, KVQuant 2..4; default 4)")
  g.add_argument("--kv-group-size", type=int, default=32,
                 help="KIVI: tokens per key group and channels per value group (must divide head_dim)")
  g.add_argument("--kv-residual", type=int, default=128,
                 help="KIVI: recent tokens kept in full precision, a multiple of the group size (default 128)")
  g.add_argument("--kv-outliers", type=float, default=0.01,
                 help="KVQuant: fraction of values kept exact (dense-and-sparse, default 0.01)")
  g.add_argument("--kv-first-fp", type=int, default=1,
                 help="KVQuant: first tokens (absolute positions) kept in full precision (default 1)")
  g.add_argument("--kv-calib-nsamples", type=int, default=16, help="KVQuant calibration windows (default 16)")
  g.add_argument("--kv-uniform", action="store_true", help="KVQuant: uniform grid instead of the k-means codebook")
  g.add_argument("--kv-fisher", action="store_true", help="KVQuant: Fisher-weighted k-means")


KIVI_FLAGS = ("kv_group_size", "kv_residual")
KVQUANT_FLAGS = {"kv_outliers": "outlier_fraction", "kv_first_fp": "first_fp", "kv_calib_nsamples": "nsamples",
                 "kv_uniform": "nuq", "kv_fisher": "fisher"}


def scopes(args):
  """``(flags, applies, needs)`` for :func:`qjax.cli.common.check_scopes`."""
  m = args.kv_method
  return [(("kv_bits",), m in ("kivi", "kvquant"), "--kv-method kivi or kvquant"),
          (KIVI_FLAGS, m == "kivi", "--kv-method kivi"),
          (tuple(KVQUANT_FLAGS), m == "kvquant", "--kv-method kvquant")]


def validate(args, head_dim: int | None = None):
  """Checks that need no weights (``head_dim`` from the model's config): KIVI's group size against
  ``head_dim`` first, then the configs' own checks."""
  if args.kv_method in (None, "none"):
    return
  if args.kv_method == "kivi" and head_dim is not None and head_dim % args.kv_group_size:
    raise InputError(f"KIVI --kv-group-size {args.kv_group_size} must divide head_dim {head_dim} (value groups "
                     f"are channels of one head)")
  config(args.kv_method, args.kv_bits, args)  # the configs validate their fields


def config(method: str, bits: int, args):
  """The frozen config of ``method`` at ``bits`` with the other settings from ``args``."""
  if method == "kivi":
    return kivi.KIVIConfig(bits=bits, group_size=args.kv_group_size, residual=args.kv_residual)
  if method == "kvquant":
    if args.kv_calib_nsamples < 1:
      raise InputError(f"--kv-calib-nsamples must be positive, got {args.kv_calib_nsamples}")
    return kvquant.KVQuantConfig(bits=bits, outlier_fraction=args.kv_outliers, first_fp=args.kv_first_fp,
                                 nsamples=args.kv_calib_nsamples, nuq=not args.kv_uniform, fisher=args.kv_fisher)
  raise InputError(f"unknown KV method {method!r} (known: {', '.join(KV_METHODS)})")


def _flag_values(given, fields: dict[str, str], args) -> dict:
  """``{config field: value}`` of the KV flags the user set (``--kv-uniform`` is ``nuq = False``)."""
  out = {field: getattr(args, dest) for dest, field in fields.items() if dest in given}
  if "nuq" in out:
    out["nuq"] = not out["nuq"]
  return out


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
  if method == "none":
    return "none", None, None
  if method == "kivi":
    base = kivi.KIVIConfig(**saved["config"]) if saved_method == "kivi" else config("kivi", args.kv_bits, args)
    flags = _flag_values(given, {"kv_bits": "bits", "kv_group_size": "group_size", "kv_residual": "residual"}, args)
    return "kivi", dataclasses.replace(base, **flags), None
  if kv_calibration is None:
    raise InputError("KVQuant calibrates on the float model and this checkpoint holds no KVQuant calibration: run "
                     "--kv-method kvquant with --model (then --save keeps the calibration with the checkpoint)")
  saved_cfg = kvquant.KVQuantCalibration.from_dict(kv_calibration).config
  wanted = dataclasses.replace(saved_cfg, **_flag_values(given, {"kv_bits": "bits", **KVQUANT_FLAGS}, args))
  if wanted != saved_cfg:
    diff = ", ".join(f"{f} {getattr(saved_cfg, f)} -> {getattr(wanted, f)}" for f in
                     (f.name for f in dataclasses.fields(saved_cfg)) if getattr(saved_cfg, f) != getattr(wanted, f))
    raise InputError(f"this checkpoint's KVQuant calibration is kvquant-{saved_cfg.bits} and the flags ask for "
                     f"{diff}: a new calibration needs the float model (use --model), or drop those flags to reuse "
                     f"the saved one")
  return "kvquant", saved_cfg, kv_calibration


def calibration_windows(args, model: CausalLM, tokenizer, cfg: kvquant.KVQuantConfig):
  """KVQuant's calibration windows: ``cfg.nsamples`` seeded windows of the calibration text flags' text."""
  path = getattr(args, "calib_text", None) or assets.named_text(
      getattr(args, "calib_dataset", None) or "tinystories", assets.CALIB_DATASETS)
  tokens = data.tokenize(tokenizer, data.read_text(path))
  return calibration.calibration_windows(model, tokens, cfg.nsamples, cfg.seqlen, args.seed)


def bytes_per_token(kv, model: CausalLM, max_len: int) -> dict:
  """Measured stored bytes per cached token of a one-row cache of ``max_len`` slots, and of the dense cache."""
  dtype = jnp.dtype(model.dtype)
  return {"bytes_per_token": cache_bytes_per_token(kv.cache_factory(model.config, 1, max_len, dtype)),
          "dense_bytes_per_token": cache_bytes_per_token(KVCache.dense(model.config, 1, max_len, dtype)),
          "max_len": max_len}
