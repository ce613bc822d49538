"""Flax Linen building blocks shared by the model families.

Every parameter is declared with ``self.variable("params", ...)`` so a leaf may hold either a dense array or a
:class:`~qjax.core.formats.qarray.QArray` (a quantized linear weight): the Linen shape check of ``self.param`` would reject a
pytree leaf. Linear weights use the HF ``[out_features, in_features]`` layout.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.core.formats.base import is_quantized
from qjax.kernels import kv_attention
from qjax.kernels.qmatmul import qmatmul

Hook = Callable[[jax.Array], jax.Array] | None


@dataclasses.dataclass(frozen=True)
class ActivationHooks:
  """Optional activation quantizers applied inside the forward pass (all ``None``: full precision).

  ``linear_input(x)`` is applied to the input of every decoder linear; ``attn_q``, ``attn_k``, ``attn_probs``
  and ``attn_v`` to the operands of the two attention matmuls (``Q K^T`` and ``P V``). Each maps an array to an
  array of the same shape and dtype (e.g. a fake quantizer); ``attn_k``/``attn_v`` see ``[b, s, kv_heads, d]``.

  ``kv_past`` replaces attention in a cache-free forward pass to simulate a quantized KV cache ("quantized
  past": each query attends to the keys/values a quantized cache would hold at its decode step):
  ``kv_past(q, k, v, positions, mask, scale, rope, layer) -> o [b, t, h, d]`` with ``q`` after RoPE, ``k``
  BEFORE RoPE, ``rope(x, positions)`` (None without RoPE) and the decoder layer's index; see
  :func:`mixed_attention`.
  """
  linear_input: Hook = None
  attn_q: Hook = None
  attn_k: Hook = None
  attn_probs: Hook = None
  attn_v: Hook = None
  kv_past: Callable | None = None


def _apply(hook: Hook, x):
  return x if hook is None else hook(x)


def _normal(std=0.02):
  init = nn.initializers.normal(std)
  return lambda rng, shape, dtype: init(rng, shape, dtype)


class Linear(nn.Module):
  """``y = x @ W^T + b`` with ``W [out, in]`` dense or quantized, through :func:`qjax.kernels.qmatmul.qmatmul` with
  ``implementation`` (``"auto"``: the platform's kernels, falling back to the XLA reference)."""
  in_features: int
  out_features: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  input_hook: Hook = None
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x):
    w = self.variable("params", "weight",
                      lambda: _normal()(self.make_rng("params"), (self.out_features, self.in_features), self.dtype))
    y = qmatmul(x, w.value, self.input_hook, implementation=self.implementation)
    if self.use_bias:
      b = self.variable("params", "bias", lambda: jnp.zeros((self.out_features,), self.dtype))
      y = y + b.value.astype(y.dtype)
    return y


class Embed(nn.Module):
  """Token (or position) embedding ``[num_embeddings, features]``; :meth:`attend` is the tied output projection
  (a ``qmatmul`` with ``implementation``)."""
  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  implementation: str = "auto"

  def setup(self):
    self.weight = self.variable(
        "params", "weight", lambda: _normal()(self.make_rng("params"), (self.num_embeddings, self.features),
                                              self.dtype))

  def __call__(self, ids):
    w = self.weight.value
    return w.take_rows(ids).astype(self.dtype) if is_quantized(w) else jnp.take(w, ids, axis=0)

  def attend(self, x):
    """Tied output projection ``x @ E^T``."""
    return qmatmul(x, self.weight.value, implementation=self.implementation)


class RMSNorm(nn.Module):
  """LLaMA RMSNorm, variance in float32: ``w * (x / sqrt(mean(x^2) + eps))``."""
  features: int
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.variable("params", "weight", lambda: jnp.ones((self.features,), self.dtype)).value
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return w * y.astype(x.dtype)


class LayerNorm(nn.Module):
  """Affine LayerNorm computed in float32."""
  features: int
  eps: float = 1e-5
  affine: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.affine:
      w = self.variable("params", "weight", lambda: jnp.ones((self.features,), self.dtype)).value
      b = self.variable("params", "bias", lambda: jnp.zeros((self.features,), self.dtype)).value
      y = y * w.astype(jnp.float32) + b.astype(jnp.float32)
    return y.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict) -> jax.Array:
  """RoPE inverse frequencies ``[head_dim // 2]`` (float32), with ``linear`` or ``llama3`` scaling.

  llama3 (Llama 3.1): wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are divided
  by ``factor``, shorter than ``... / high_freq_factor`` are kept, and the band between is interpolated.
  """
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    return inv / scaling["factor"]
  if kind == "llama3":
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return jnp.where(medium, smoothed, scaled)
  return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, HF "rotate half" convention. ``x [b, t, heads, d]``, ``positions [b, t]``."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention(q, k, v, mask, scale: float, hooks: ActivationHooks, *, causal: bool = False):
  """Grouped-query attention (:func:`qjax.kernels.kv_attention.attention`; ``causal``: a self-attention mask,
  computed in query blocks)."""
  return kv_attention.attention(q, k, v, mask, scale, hooks, causal=causal)


def mixed_attention(q, k, v, k_hat, v_hat, exact, mask, scale: float):
  """Attention where query ``t`` sees key/value ``s`` exactly where ``exact [b | 1, t, s]`` is True and as the
  quantized ``k_hat, v_hat`` elsewhere (``q [b, t, h, d]``; ``k, v, k_hat, v_hat [b, s, kvh, d]``; causal self-
  attention ``mask [b, t, s]``, computed in query blocks: :func:`qjax.kernels.kv_attention.causal_blocks`).
  Scores and softmax in float32; returns ``[b, t, h, d]`` in ``q.dtype``."""
  def attend(q, exact, mask, k, v, k_hat, v_hat):
    e = exact[:, None, None]
    s = jnp.where(e, kv_attention.heads_scores(q, k, scale), kv_attention.heads_scores(q, k_hat, scale))
    p = kv_attention.masked_softmax(s, mask, v.dtype)
    return (kv_attention.heads_output(jnp.where(e, p, 0), v)
            + kv_attention.heads_output(jnp.where(e, 0, p), v_hat.astype(v.dtype)))

  return kv_attention.causal_blocks(attend, q, (exact, mask), (k, v, k_hat, v_hat))


def causal_mask(attention_mask: jax.Array) -> jax.Array:
  """``[b, t, t]`` causal mask that also hides padded keys (``attention_mask [b, t]``, 1 = real token)."""
  t = attention_mask.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  return causal[None] & attention_mask.astype(bool)[:, None, :]
