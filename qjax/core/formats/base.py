"""The base of every quantized tensor pytree and the registry of qjax's own quantized types (the allow-list a
checkpoint's metadata is resolved against)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


class QuantizedTensor:
  """Base of the quantized weight pytrees (registered dataclasses whose array fields are leaves and whose
  ``static`` fields are metadata). Subclasses provide ``shape``, ``dtype`` and :meth:`dequantize`; every linear
  layer, the checkpoint writer and the size accounting accept any registered subclass."""

  def dequantize(self) -> jax.Array:
    raise NotImplementedError

  def take_rows(self, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` (any integer shape ``S``) of the dequantized matrix, ``S + [in]``: an embedding lookup. This
    default dequantizes the whole matrix; formats with row-wise storage gather the stored rows first."""
    return jnp.take(self.dequantize(), ids, axis=0)

  @property
  def nbytes(self) -> int:
    """Bytes actually stored (every array leaf)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(self))

  @property
  def size(self) -> int:
    """Number of weights represented."""
    return int(np.prod(self.shape))


QUANTIZED_TYPES: dict[str, type] = {}


def register_quantized(cls):
  """Class decorator: a frozen dataclass pytree (fields with ``metadata=dict(static=True)`` are static)."""
  cls = jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))
  QUANTIZED_TYPES[cls.__name__] = cls
  return cls


def static_fields(cls) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("static"))


def data_fields(cls) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("static"))


def is_quantized(x) -> bool:
  """True for any quantized weight pytree (a :class:`QuantizedTensor`)."""
  return isinstance(x, QuantizedTensor)
