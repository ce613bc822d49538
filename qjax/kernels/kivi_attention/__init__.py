"""``kivi_attention(q, keys, values, k_pend, v_pend, mask_store, mask_pend, length, scale)``: decode attention of a
few new queries against a KIVI cache read directly from its packed codes (the kernel behind
:meth:`qjax.methods.kv.kivi.KIVILayerCache.attend`).

Operands (``b`` rows, ``t`` queries, ``h`` query heads over ``kvh`` KV heads, head size ``d``):
  * ``q [b, t, h, d]`` float32 / bfloat16 / float16, after RoPE; query head ``g * h / kvh + r`` reads KV head ``g``;
  * ``keys``: :class:`~qjax.core.formats.kv.KIVITensor` ``[b, kvh, L, d]``, quantized per channel in groups of
    ``G`` tokens (``scale, mn [b, kvh, L / G, d]``); ``values``: ``[b, kvh, L, d]`` per token in groups of ``G``
    channels (``scale, mn [b, kvh, L, d / G]``); codes packed along ``d`` in uint8 words; keys after RoPE;
  * ``k_pend, v_pend [b, P, kvh, d]``: the exact tokens (the residual window and the call's own tokens);
  * ``mask_store [b, t, L]``, ``mask_pend [b, t, P]`` bool: which store / pending tokens each query reads;
  * ``length [b]`` int32: store tokens at index ``>= length`` are never read (an implementation may stop there);
  * ``scale``: the score factor (``d ** -0.5``).

Result ``[b, t, h, d]`` in ``q.dtype``::

  s = scale * q . [K_hat | K_pend]  (float32),   p = softmax over the visible tokens,   out = p . [V_hat | V_pend]

with ``K_hat = codes * scale + mn`` (:meth:`KIVITensor.dequantize`). A query that sees no token at all has an
unspecified output (nothing reads it: padding). Implementations never form ``K_hat`` or ``V_hat`` for the whole
store; the algebra they use (KIVI, section 3)::

  q . k_hat_s = sum_c (q_c scale_{g(s), c}) code_{s, c} + sum_c q_c mn_{g(s), c}
  sum_s p_s v_hat_{s, c} = sum_s (p_s scale_{s, g(c)}) code_{s, c} + sum_s p_s mn_{s, g(c)}

``xla.py`` is the spec (dequantize the store, one attention); implementations register with :data:`OP` on the
key tensor type and raise ``NotImplementedError`` for what they do not cover (then the dispatcher runs the spec).
"""
from __future__ import annotations

from qjax.core.formats.kv import KIVITensor
from qjax.kernels.dispatch import Op
from qjax.kernels.kivi_attention import xla

__all__ = ["OP", "kivi_attention", "path_name"]

OP = Op("kivi_attention", dispatch_arg=1)
OP.reference(KIVITensor)(xla.kivi_attention)


def kivi_attention(q, keys, values, k_pend, v_pend, mask_store, mask_pend, length, scale: float, *,
                   implementation: str = "auto", fallback: bool = True):
  """Attention of ``q`` over a KIVI store and exact pending tokens (module docstring), through the dispatcher."""
  return OP(q, keys, values, k_pend, v_pend, mask_store, mask_pend, length, scale, implementation=implementation,
            fallback=fallback)


def path_name(keys, implementation: str = "auto") -> str:
  """Which path :func:`kivi_attention` takes for ``keys`` (CLI summaries)."""
  return OP.path_name(None, keys, implementation=implementation)
# the implementations register with OP, so they are imported after it exists
from qjax.kernels.kivi_attention import cpu  # noqa: E402,F401  (registers the implementation)
from qjax.kernels.kivi_attention import pallas_tpu  # noqa: E402,F401  (registers the implementation)
from qjax.kernels.kivi_attention import pallas_triton  # noqa: E402,F401  (registers the implementation)
