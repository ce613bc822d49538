"""The command-line flag the KV-cache methods' configs share (see :mod:`qjax.core.options`)."""
from __future__ import annotations

from qjax.core.options import Flag

KV_BITS = Flag("--kv-bits", "KV bits (KIVI 2..8, KVQuant 2..4)")
