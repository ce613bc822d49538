"""Helpers for parameter pytrees addressed by ``/``-joined paths (``model/layers_0/self_attn/q_proj/weight``)."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import jax

from qjax.core.formats.base import is_quantized


def path_str(keypath) -> str:
  """``('model', 'layers_0', 'weight')`` key path -> ``"model/layers_0/weight"``."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def flatten(params) -> dict:
  """``{path: leaf}`` with quantized tensors (QArray, ...) kept whole."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
  return {path_str(kp): v for kp, v in leaves}


def unflatten(flat: dict) -> dict:
  """Inverse of :func:`flatten` for nested-dict trees."""
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def matching(params, patterns: Iterable[str]) -> list[str]:
  """Sorted paths whose string fully matches any of the regexes."""
  regs = [re.compile(p) for p in patterns]
  return sorted(p for p in flatten(params) if any(r.fullmatch(p) for r in regs))


def replace(params, paths: Iterable[str], fn: Callable[[str, object], object]) -> dict:
  """A new tree where each leaf at ``paths`` is ``fn(path, leaf)``; the input tree is not modified."""
  flat = flatten(params)
  for p in paths:
    flat[p] = fn(p, flat[p])
  return unflatten(flat)


def subtree(flat: dict, prefix: str) -> dict:
  """The nested tree below ``prefix`` (e.g. one decoder layer, ``model/layers_3``) of a flat ``{path: leaf}``
  dict, with paths relative to it."""
  n = len(prefix) + 1
  return unflatten({p[n:]: v for p, v in flat.items() if p.startswith(prefix + "/")})
