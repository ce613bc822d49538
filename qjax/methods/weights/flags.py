"""The command-line flags several weight methods' configs share (each config names them in its fields, see
:mod:`qjax.core.options`); a flag only one method reads is declared in that method's config."""
from __future__ import annotations

from qjax.core.options import Flag

BITS = Flag("--wbits", "weight bits, 2..8 (ZeroQuant: the MLP linears')")
GROUP_SIZE = Flag("--groupsize", "input columns per group; -1 = per output channel")
SYM = Flag("--sym", "symmetric weight quantization (--no-sym: asymmetric)")
ACT_ORDER = Flag("--act-order", "quantize columns by descending diag(H)")
PERCDAMP = Flag("--percdamp", "Hessian damping, fraction of mean(diag H)")
BLOCK_SIZE = Flag("--block-size", "lazy error-feedback block, columns")
TRUE_SEQUENTIAL = Flag("--true-sequential", "quantize a layer's sub-groups in order, re-collecting inputs")
