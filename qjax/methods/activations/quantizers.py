"""Dynamic activation quantization inside the forward pass (reference notes section 2.3).

A :class:`TokenQuantizer` quantizes each token (the last axis of an activation, or contiguous groups of
``group_size`` channels of it) with its own range, computed at every call ("dynamic"). Two level schemes:

* ``"minmax"`` (default): the reference's uniform quantizer of :mod:`qjax.core.uniform` (range contains 0;
  asymmetric with an integer zero point, or symmetric on the grid ``{-2^(b-1) .. 2^(b-1)-1} * 2 absmax / maxq``).
* ``"absmax"``: DeepSpeed's symmetric quantizer used by ZeroQuant: ``s = 2 max|x| / 2^b``,
  ``x_hat = s * clip(round(x / s), -2^(b-1), 2^(b-1) - 1)``.

Fake quantization (quantize-dequantize in float) has a straight-through gradient (identity), so the same
quantizer serves quantization-aware training (ZeroQuant's LKD). :meth:`TokenQuantizer.int8_codes` gives the
integer form used by the real int8 matmul (:mod:`qjax.kernels.int8_matmul`): ``x ~= scale * (codes - zero)``
with signed int8 codes, exactly the values the fake path produces.

:class:`ActQuantConfig` turns a model-wide setting into :class:`~qjax.models.layers.ActivationHooks`: every
decoder linear's input and, with ``attention_matmuls``, the operands of ``Q K^T`` and ``P V``. Differences from
the reference, on purpose:

* Q1 (symmetric mode on non-negative rows, e.g. softmax probabilities) is fixed in :mod:`qjax.core.uniform`.
* The reference quantizes ``V`` per channel *across all key tokens of the call*, so the quantization of a past
  value depends on future tokens (not causal, and impossible to reproduce token by token with a KV cache).
  Here ``V`` is quantized per token over ``head_dim``, like ``K``.
* Grouped activation quantization is allowed together with the attention matmuls (the reference asserts);
  the group size applies to linear inputs only, attention operands are always per token (per head).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qjax.core import uniform
from qjax.models.layers import ActivationHooks

SCHEMES = ("minmax", "absmax")


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def straight_through(fn, x):
  """``fn(x)`` in the forward pass, identity gradient (straight-through estimator)."""
  return fn(x)


@straight_through.defjvp
def _straight_through_jvp(fn, primals, tangents):
  return straight_through(fn, primals[0]), tangents[0]


@dataclasses.dataclass(frozen=True)
class TokenQuantizer:
  """Per-token (or per group of ``group_size`` channels) dynamic quantizer of ``x [..., n]``; see module doc."""
  bits: int
  sym: bool = False
  group_size: int = -1
  scheme: str = "minmax"

  def __post_init__(self):
    if self.scheme not in SCHEMES:
      raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
    if self.scheme == "absmax" and not self.sym:
      raise ValueError("the absmax scheme is symmetric")

  def _codes(self, xg):
    """Float32 ``(q, scale, zero)`` of grouped ``xg [..., G, g]`` with ``x_hat = scale * (q - zero)``."""
    if self.scheme == "absmax":
      absmax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
      scale = jnp.where(absmax > 0, 2 * absmax / 2**self.bits, 1.0)
      half = 2 ** (self.bits - 1)
      q = jnp.clip(jnp.round(uniform.true_divide(xg, scale)), -half, half - 1)
      return q, scale, jnp.zeros_like(scale)
    scale, zero = uniform.fit(xg, self.bits, self.sym)
    return uniform.quantize(xg, scale, zero, self.bits), scale, zero

  def fake(self, x: jax.Array) -> jax.Array:
    """Quantize-dequantize (same shape and dtype), no gradient rule."""
    n = x.shape[-1]
    q, scale, zero = self._codes(uniform.to_groups(x.astype(jnp.float32), self.group_size))
    return uniform.from_groups(uniform.dequantize(q, scale, zero), n).astype(x.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Fake quantization with a straight-through gradient."""
    return straight_through(self.fake, x)

  @property
  def supports_int8(self) -> bool:
    """Whether :meth:`int8_codes` applies (8 bits, one range per token)."""
    return self.bits == 8 and self.group_size == -1

  def int8_codes(self, x: jax.Array):
    """``(codes int8 [..., n], scale float32 [..., 1], zero int32 [..., 1])`` with ``x_hat = scale * (codes -
    zero)`` equal to :meth:`fake` (the unsigned minmax grid is shifted by 128 into int8)."""
    if not self.supports_int8:
      raise ValueError("int8 codes need 8 bits and per-token ranges")
    q, scale, zero = self._codes(x.astype(jnp.float32)[..., None, :])
    shift = 0 if self.scheme == "absmax" else 128
    return ((q[..., 0, :] - shift).astype(jnp.int8), scale[..., 0, :],
            (zero[..., 0, :] - shift).astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class ActQuantConfig:
  """Model-wide activation quantization: ``bits`` (16 = off), symmetric or not, ``group_size`` channels per
  range for linear inputs (-1 = per token), ``attention_matmuls`` to also quantize Q, K, P and V; ``kv_bits``
  (16 = off) quantizes only the keys and values attention reads (the KV cache: per token and head, after RoPE,
  as LLM-QAT's KV quantization; with ``attention_matmuls`` they take ``kv_bits`` instead of ``bits``)."""
  bits: int = 16
  sym: bool = False
  group_size: int = -1
  attention_matmuls: bool = False
  scheme: str = "minmax"
  kv_bits: int = 16

  def __post_init__(self):
    for name in ("bits", "kv_bits"):
      v = getattr(self, name)
      if v != 16 and not 2 <= v <= 8:
        raise ValueError(f"activation {name} must be between 2 and 8 (or 16 for none), got {v}")

  @property
  def enabled(self) -> bool:
    return self.bits < 16 or self.kv_bits < 16

  def linear_quantizer(self) -> TokenQuantizer:
    return TokenQuantizer(self.bits, self.sym, self.group_size, self.scheme)

  def hooks(self) -> ActivationHooks:
    """The model's :class:`ActivationHooks` (all ``None`` when disabled)."""
    linear = self.linear_quantizer() if self.bits < 16 else None
    kv = TokenQuantizer(self.kv_bits, self.sym, -1, self.scheme) if self.kv_bits < 16 else None
    if not (self.attention_matmuls and self.bits < 16):
      return ActivationHooks(linear_input=linear, attn_k=kv, attn_v=kv)
    per_token = TokenQuantizer(self.bits, self.sym, -1, self.scheme)
    return ActivationHooks(linear_input=linear, attn_q=per_token, attn_k=kv or per_token, attn_probs=per_token,
                           attn_v=kv or per_token)
