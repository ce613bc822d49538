"""``kv_attention(layer_cache, q, k_new, v_new, ...)``: decode-time attention of new tokens against a layer's KV
cache (dense, KIVI, KVQuant), the cache-attend protocol's kernel op.

``xla.py`` is the reference (update the cache, read it back dense, attend); a fused kernel for a cache type (e.g.
attention directly on a KIVI cache's packed codes) registers with :data:`OP` keyed on that layer cache's class and
falls back to the reference for what it does not support (:mod:`qjax.kernels.dispatch`).
"""
from __future__ import annotations

from qjax.kernels.dispatch import Op
from qjax.kernels.kv_attention import xla
from qjax.kernels.kv_attention.xla import (attention, causal_blocks, heads_output, heads_scores, kv_heads,
                                           masked_softmax, merge_heads, split_heads)

__all__ = ["ATTENTION_QUANTIZERS", "OP", "attention", "causal_blocks", "heads_output", "heads_scores", "kv_attention",
           "kv_heads", "masked_softmax", "merge_heads", "path_name", "split_heads"]

OP = Op("kv_attention", dispatch_arg=0)
ATTENTION_QUANTIZERS = ("attn_q", "attn_k", "attn_probs", "attn_v")   # hooks the kernels do not take (XLA runs them)
OP.reference(object)(xla.update_then_attend)
xla.update_then_attend.path = lambda: "xla (keys and values read back dense)"


def kv_attention(layer_cache, q, k_new, v_new, *, index, positions, rope, mask, scale, hooks=None,
                 implementation: str = "auto"):
  """``(out [b, t, h, d], new layer cache)`` for queries ``q [b, t, h, d]`` (after RoPE) and the new tokens'
  keys (BEFORE RoPE) and values ``k_new, v_new [b, t, kvh, d]`` written at slot ``index``; ``rope(x, positions)``
  or None; ``mask [b, t, max_len]``."""
  return OP(layer_cache, q, k_new, v_new, index=index, positions=positions, rope=rope, mask=mask, scale=scale,
            hooks=hooks, implementation=implementation)


def path_name(layer_cache, implementation: str = "auto") -> str:
  """Which path :func:`kv_attention` takes for ``layer_cache`` (CLI summaries)."""
  return OP.path_name(layer_cache, implementation=implementation)


# the implementations register with OP, so they are imported after it exists
from qjax.kernels.kv_attention import cpu  # noqa: E402,F401  (registers the implementation)
