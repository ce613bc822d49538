"""Low-rank adapters (LoRA, Hu et al. 2021): ``W' = W + (alpha / r) B A`` with ``A [r, in]`` Gaussian
(std ``1 / sqrt(in)``) and ``B [out, r]`` zero at the start, so training starts at ``W`` exactly."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.core.errors import InputError
from qjax.core.options import Flag

RANK = Flag("--lora-rank", "LoRA adapter rank")
ALPHA = Flag("--lora-alpha", "LoRA scale numerator: the update is (alpha / rank) B A")


def check(rank: int, alpha: float, what: str):
  """Raises InputError unless ``rank`` is a positive integer and ``alpha`` positive (the configs' checks)."""
  if not isinstance(rank, int) or rank < 1:
    raise InputError(f"{what} LoRA rank must be a positive integer, got {rank!r}")
  if not alpha > 0:
    raise InputError(f"{what} LoRA alpha must be positive, got {alpha}")


def init(key: jax.Array, shape: tuple[int, int], rank: int) -> dict:
  """``{"a": [rank, in], "b": [out, rank]}`` float32 for a weight of ``shape = (out, in)``."""
  out, n = shape
  return {"a": jax.random.normal(key, (rank, n), jnp.float32) / jnp.sqrt(n), "b": jnp.zeros((out, rank), jnp.float32)}


def init_all(key: jax.Array, shapes: dict, rank: int) -> dict:
  """One adapter per path of ``shapes`` (``{path: (out, in)}``), keys folded in by sorted path order."""
  return {p: init(jax.random.fold_in(key, i), shapes[p], rank) for i, p in enumerate(sorted(shapes))}


def delta(adapter: dict, rank: int, alpha: float) -> jax.Array:
  """``(alpha / rank) B A`` ``[out, in]`` float32."""
  return (alpha / rank) * (adapter["b"] @ adapter["a"])
