"""CPU ``kv_attention`` for decode: the layer cache's ``update`` (its dense view of keys and values), then the
native attention kernel (:func:`qjax.kernels.kivi_attention.cpu.dense_attention_cpu`: one task per row and KV
head, float32 scores and softmax, only the visible slots scored) instead of XLA's einsums, whose per-step
transposes of the whole cache cost more than reading it (SmolLM2 at 512 slots: 5 ms of a 16 ms decode step).

Unsupported (``NotImplementedError``, the dispatcher then runs the XLA reference): more than 16 new tokens
(prefill), attention quantizers in ``hooks`` (W8A8 attention), a head size that is not a multiple of 8, and every
case the native kernel refuses (not built, not the CPU backend, other dtypes)."""
from __future__ import annotations

import importlib

from qjax.kernels.kv_attention import ATTENTION_QUANTIZERS, OP


def _native():
  """The native kernel's module, imported on first use: ``qjax.kernels.kivi_attention`` imports this package (its
  XLA spec is built on :func:`attention`), so a module-level import here would be circular."""
  return importlib.import_module("qjax.kernels.kivi_attention.cpu")


@OP.implementation("cpu", object, platforms=("cpu",))
def update_then_attend(layer_cache, q, k_new, v_new, *, index, positions, rope, mask, scale, hooks=None):
  if any(getattr(hooks, n, None) is not None for n in ATTENTION_QUANTIZERS):
    raise NotImplementedError("cpu kv_attention: attention quantizers run in the XLA reference")
  native = _native()
  if not 0 < q.shape[1] <= native.MAX_T or not native.available():
    raise NotImplementedError(f"cpu kv_attention: {q.shape[1]} new tokens (decode kernel: 1..{native.MAX_T})")
  k, v, new = layer_cache.update(k_new, v_new, index, positions, rope)
  return native.dense_attention_cpu(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale), new


update_then_attend.path = lambda: (f"cpu kernel (native, t <= {_native().MAX_T}; prefill: xla)"
                                   if _native().available() else None)
