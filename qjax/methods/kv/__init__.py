"""KV-cache quantization methods (KIVI, KVQuant): each registers a ``setup`` that returns a
:class:`qjax.methods.registry.KVCacheSetup` (cache factory, quantized-past hook, bits per cached element)."""
from __future__ import annotations

from qjax.methods.kv import kivi, kvquant  # noqa: F401  (registration)
