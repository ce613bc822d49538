"""Parameters that are not in memory yet: the leaves a streaming run's parameter tree holds instead of arrays.

A :class:`Deferred` leaf knows its ``shape``, ``dtype``, ``size`` and stored ``nbytes`` and how to read itself
(:meth:`Deferred.load`: an array or a quantized tensor). The layer-wise calibration materializes one decoder
layer's leaves at a time (:func:`materialize`) and drops them when the layer is done, so host memory holds one
layer whatever the depth; the readers (a memory-mapped safetensors file, a staged output layer) live in
:mod:`qjax.io`. Nothing here touches a file.
"""
from __future__ import annotations

import math

import jax

from qjax.core.formats.base import is_quantized


class Deferred:
  """Base of a parameter read on demand. Subclasses set ``shape``, ``dtype`` and ``nbytes`` and implement
  :meth:`load`."""
  shape: tuple[int, ...]
  dtype: object
  nbytes: int

  @property
  def size(self) -> int:
    """Number of weights represented."""
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def load(self):
    raise NotImplementedError

  @classmethod
  def load_all(cls, leaves: list) -> list:
    """``[leaf.load() for leaf in leaves]`` (all of this class); readers that open a file at a cost override it
    to open each file once for the lot (a GGUF header takes seconds to parse)."""
    return [leaf.load() for leaf in leaves]


def is_deferred(x) -> bool:
  return isinstance(x, Deferred)


def materialize(params):
  """``params`` with every :class:`Deferred` leaf read (other leaves, quantized tensors whole, unchanged); the
  leaves of one reader class are read together (:meth:`Deferred.load_all`)."""
  leaves, treedef = jax.tree.flatten(params, is_leaf=lambda v: is_deferred(v) or is_quantized(v))
  by_class: dict[type, list[int]] = {}
  for i, v in enumerate(leaves):
    if is_deferred(v):
      by_class.setdefault(type(v), []).append(i)
  for cls, ids in by_class.items():
    for i, v in zip(ids, cls.load_all([leaves[i] for i in ids])):
      leaves[i] = v
  return jax.tree.unflatten(treedef, leaves)
