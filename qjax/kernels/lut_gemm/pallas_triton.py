"""Pallas Triton (GPU) ``lut_gemm``: ``x @ W^T`` for a :class:`~qjax.core.formats.bcq.BCQArray` weight, the bit
planes read packed from HBM (never decompressed to memory).

Shapes and dtypes (the op's contract, :mod:`qjax.kernels.lut_gemm`):
  * ``x [..., K]`` float32 / bfloat16 / float16 (leading dims flattened to ``M`` rows), result ``[..., N]`` in
    ``x.dtype``, accumulated in float32;
  * ``W``: ``planes [q, N, ceil(K / 32)]`` uint32 (bit ``k % 32`` of word ``k // 32`` set where ``b_i[n, k] = +1``),
    ``q`` 1..8; ``alpha [N, G, q]`` and ``offset [N, G]`` (or None) in any float dtype (widened to float32 in the
    kernel); per channel or groups of a multiple of 32 input columns (the last group may be partial, ``K`` need not
    be a multiple of 32); an optional ``perm``: the activation columns are permuted once per call (``x[..., perm]``)
    and the kernel runs on the stored column order.

Formulation: the binary-coded GEMV, not LUT-GEMM's table lookup. LUT-GEMM builds, per 8 activations, the 256 signed
sums ``T[c, p]`` in shared memory and turns each byte of a bit plane into one lookup ``T[c, byte]``. Pallas Triton
(jax 0.10.2) cannot express that: a data-dependent gather from a register tensor has no lowering (``gather``:
"Unimplemented primitive in Pallas Triton lowering"), and the Triton backend offers no scratch (shared) memory to
hold the table. The only gather it lowers is a pointer load from a kernel operand, which would need the tables
materialized in HBM by a separate op (``128 M K`` bytes per call: at ``M = 1`` a quarter of a 1-bit weight with
``N = 4096``) and one divergent cached load per byte and bit plane; not done here. So the kernel computes the same
sums by expanding the bit planes in registers:
``sum_i alpha[n, g, i] * sum_{k in g} b_i[n, k] x[m, k] + offset[n, g] * sum_{k in g} x[m, k]`` equals
``x . w`` with the tile ``w[n, k] = sum_i alpha[n, g(k), i] b_i[n, k] + offset[n, g(k)]`` built in float32
registers (``b_i = +-1``: one shift, mask and select per bit) and consumed at once by a multiply-reduce or a dot.

Tiling: a grid over ``(M / bm, N / bn)``; each program loops over ``K`` in blocks of ``bk`` columns (a power of two
>= 32: ``bk / 32`` whole words per row and bit plane). Every word lies inside one group (groups are multiples of 32
columns), so a block's alphas and offsets are gathered per word (``[bn, bk / 32]`` pointer loads at group index
``word // (group_size / 32)``): any group size that is a multiple of 32 takes any ``bk``, blocks may hold several
groups or straddle a group boundary. The weight tile ``[bn, bk]`` then meets the ``[bm, bk]`` activation block:
an elementwise multiply-reduce in float32 for ``M <= 4`` (no 16-row padding of a dot), else ``dot_general`` with
the tile rounded to ``x.dtype`` (float32: IEEE precision, no TF32), float32 accumulation. Blocks past ``N``, ``K``
or ``M`` are handled by masked loads (masked words read as 0, masked alphas and offsets as 0, so the tile is 0
there; masked activations read as 0) and a masked store; nothing is padded. Block sizes come from
:func:`choose_tiling` (first choices, not yet timed on a GPU: the tests run the kernel through the interpreter and
check its CUDA lowering). Off GPU the same kernel runs with ``interpret=True``.

Unsupported (``NotImplementedError``, the dispatcher then falls back to the XLA reference): other activation dtypes,
more than 8 bit planes, planes not packed in uint32, and group sizes below ``K`` that are not a multiple of 32
(e.g. 16 or 48: a word would straddle two groups).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from qjax.core.formats.bcq import BCQArray
from qjax.kernels.lut_gemm import OP
from qjax.kernels.qmatmul.pallas_triton import Tiling, is_pow2, pow2_ceil
from qjax.kernels.qmatmul.xla import suffix

__all__ = ["Tiling", "choose_tiling", "lut_gemm_pallas"]

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MAX_BITS = 8       # bit planes unrolled in the kernel (the BCQ method stores 1..8)
_WORD = 32          # columns per packed word


def choose_tiling(m: int, n_out: int, n_in: int) -> Tiling:
  """Block sizes for ``M = m`` rows (see the module docstring); the group size does not constrain them.

  * GEMV, ``m <= 4``: memory bound on the weight, so narrow programs over ``N`` (bn 16-32, for occupancy on ~100+
    SMs) and long K blocks (256 columns: 32 contiguous bytes per row and plane, fewer loop steps); the
    ``[bm, bn, bk]`` product is kept at 8K elements (64 float32 registers per thread at 4 warps).
  * ``4 < m <= 16``: the dot on 16 rows, bn 64, bk 128.
  * GEMM, ``m > 16``: tensor-core tiles 64x64 (m <= 64) or 128x128 with bk 64 and 3 pipeline stages.
  ``bk`` never exceeds ``K`` rounded up to a power of two (>= 32), ``bn`` never ``N`` rounded up (>= 16).
  """
  k_block = lambda cap: max(_WORD, min(cap, pow2_ceil(n_in)))
  if m <= 4:
    bm = pow2_ceil(m)
    bk = k_block(256 if bm <= 2 else 128)
    bn, reduce, warps, stages = min(64, 8192 // (bm * bk)), True, 4, 2
  elif m <= 16:
    bm, bn, bk, reduce, warps, stages = 16, 64, k_block(128), False, 4, 3
  else:
    bm, bn = (64, 64) if m <= 64 else (128, 128)
    bk, reduce, warps, stages = k_block(64), False, 4 if bm == 64 else 8, 3
  bn = max(16, min(bn, pow2_ceil(n_out)))
  return Tiling(bm=bm, bn=bn, bk=bk, reduce=reduce, num_warps=warps, num_stages=stages)


def _check_tiling(t: Tiling):
  """An explicit tiling must have power-of-two blocks, ``bk >= 32`` (whole words) and 16-row and 16-column tiles
  for the dot."""
  if not all(map(is_pow2, (t.bm, t.bn, t.bk))) or t.bk < _WORD:
    raise ValueError(f"pallas_triton lut_gemm: blocks must be powers of two with bk >= {_WORD}, got {t}")
  if not t.reduce and min(t.bm, t.bn) < 16:
    raise ValueError(f"pallas_triton lut_gemm: the dot needs bm, bn >= 16, got {t}")


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernel body needs to know at trace time."""
  m: int
  n_out: int
  n_in: int
  bits: int
  group_words: int    # words per group (per channel: the whole row)
  n_words: int        # packed length of a row (words)
  has_offset: bool
  tiling: Tiling


def _iota(n: int, dtype=jnp.int32) -> jax.Array:
  return jax.lax.broadcasted_iota(dtype, (n,), 0)


def _weight_tile(p_ref, a_ref, off_ref, kb, col_ok: jax.Array, st: _Static) -> jax.Array:
  """Float32 ``[bn, bk]`` tile ``sum_i alpha_i b_i + offset`` of K block ``kb``; 0 past ``N`` and past the row's
  words."""
  bn, nw = st.tiling.bn, st.tiling.bk // _WORD
  word = kb * nw + _iota(nw)
  ok = col_ok[:, None] & (word < st.n_words)[None, :]                        # [bn, nw]
  rows = jax.lax.broadcasted_iota(jnp.int32, (bn, nw), 0)
  group = jnp.broadcast_to((word // st.group_words)[None, :], (bn, nw))      # each word lies in one group
  gather = lambda ref, *i: plt.load(ref.at[(rows, group, *i)], mask=ok, other=0).astype(jnp.float32)
  w = jnp.broadcast_to(gather(off_ref)[:, :, None] if st.has_offset else 0.0, (bn, nw, _WORD))
  shifts = jax.lax.broadcasted_iota(jnp.uint32, (1, 1, _WORD), 2)
  for i in range(st.bits):
    words = plt.load(p_ref.at[jnp.int32(i), :, pl.ds(kb * nw, nw)], mask=ok, other=0)   # [bn, nw] uint32
    alpha = gather(a_ref, jnp.int32(i))[:, :, None]                          # [bn, nw, 1]
    w = w + jnp.where(((words[:, :, None] >> shifts) & 1) == 1, alpha, -alpha)
  return w.reshape(bn, nw * _WORD)


def _kernel(x_ref, p_ref, a_ref, *refs, st: _Static):
  """One ``[bm, bn]`` output tile: ``x [bm, K] . W[bn, K]^T`` over K blocks, float32 accumulator."""
  off_ref, o_ref = refs if st.has_offset else (None, refs[0])
  t = st.tiling
  rows = pl.program_id(0) * t.bm + _iota(t.bm)
  cols = pl.program_id(1) * t.bn + _iota(t.bn)
  row_ok, col_ok = rows < st.m, cols < st.n_out

  def step(kb, acc):
    k_ok = kb * t.bk + _iota(t.bk) < st.n_in
    x = plt.load(x_ref.at[:, pl.ds(kb * t.bk, t.bk)], mask=row_ok[:, None] & k_ok[None, :], other=0)
    w = _weight_tile(p_ref, a_ref, off_ref, kb, col_ok, st)
    if t.reduce:
      return acc + jnp.sum(x.astype(jnp.float32)[:, None, :] * w[None, :, :], axis=2)
    return acc + jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())),
                                     precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, pl.cdiv(st.n_in, t.bk), step, jnp.zeros((t.bm, t.bn), jnp.float32))
  plt.store(o_ref, acc.astype(o_ref.dtype), mask=row_ok[:, None] & col_ok[None, :])


def _refusal(w: BCQArray) -> str | None:
  """Why the kernel does not take weight ``w`` (module docstring), or None."""
  if not 1 <= w.bits <= _MAX_BITS:
    return f"{w.bits} bit planes (supported: 1..{_MAX_BITS})"
  if w.planes.dtype != jnp.uint32:
    return f"bit planes of dtype {w.planes.dtype} (supported: uint32)"
  g, n_in = w.group_size, w.shape[1]
  if g != -1 and g < n_in and g % _WORD:
    return f"group size {g} is not a multiple of {_WORD}"
  return None


def _check(x: jax.Array, w: BCQArray):
  if (reason := _refusal(w)) is not None:
    raise NotImplementedError(f"pallas_triton lut_gemm: {reason}")
  if x.dtype not in _DTYPES:
    raise NotImplementedError(f"pallas_triton lut_gemm: activations of dtype {x.dtype}")
  if x.shape[-1] != w.shape[1]:
    raise ValueError(f"lut_gemm: x has {x.shape[-1]} input features, the weight {w.shape[1]}")


def _matmul_2d(x: jax.Array, w: BCQArray, tiling: Tiling, interpret: bool) -> jax.Array:
  """``x [M, K]`` (stored column order) ``@ W^T -> [M, N]`` in ``x.dtype``: one ``pallas_call``."""
  (m, n_in), n_out = x.shape, w.shape[0]
  n_words = w.planes.shape[2]
  per_channel = w.group_size == -1 or w.group_size >= n_in
  st = _Static(m=m, n_out=n_out, n_in=n_in, bits=w.bits, group_words=n_words if per_channel else w.group_size // _WORD,
               n_words=n_words, has_offset=w.offset is not None, tiling=tiling)
  t = tiling
  weights = [w.planes, w.alpha] + ([w.offset] if st.has_offset else [])
  specs = [pl.BlockSpec((w.bits, t.bn, n_words), lambda i, j: (0, j, 0)),
           pl.BlockSpec((t.bn, *w.alpha.shape[1:]), lambda i, j: (j, 0, 0))]
  if st.has_offset:
    specs.append(pl.BlockSpec((t.bn, w.offset.shape[1]), lambda i, j: (j, 0)))
  return pl.pallas_call(
      functools.partial(_kernel, st=st),
      out_shape=jax.ShapeDtypeStruct((m, n_out), x.dtype),
      grid=(pl.cdiv(m, t.bm), pl.cdiv(n_out, t.bn)),
      in_specs=[pl.BlockSpec((t.bm, n_in), lambda i, j: (i, 0))] + specs,
      out_specs=pl.BlockSpec((t.bm, t.bn), lambda i, j: (i, j)),
      compiler_params=plt.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
      interpret=interpret,
      name=f"lut_gemm_q{w.bits}",
  )(x, *weights)


def lut_gemm_pallas(x: jax.Array, w: BCQArray, act=None, *, tiling: Tiling | None = None,
                    interpret: bool | None = None) -> jax.Array:
  """``x [..., K] @ W^T -> [..., N]`` in ``x.dtype`` with the Triton kernel (``act`` quantizes ``x`` first).

  ``tiling``: block sizes (default :func:`choose_tiling`); ``interpret``: run the kernel with the Pallas
  interpreter (default: off GPU). Raises ``NotImplementedError`` for unsupported weights (module docstring).
  """
  if act is not None:
    x = act(x)
  _check(x, w)
  lead, (n_out, n_in) = x.shape[:-1], w.shape
  x = x.reshape(-1, n_in)
  if w.perm is not None:
    x = jnp.take(x, w.perm, axis=-1)                                # stored column k is original column perm[k]
  tiling = tiling or choose_tiling(x.shape[0], n_out, n_in)
  _check_tiling(tiling)
  if x.shape[0] == 0:
    return jnp.zeros((*lead, n_out), x.dtype)
  interpret = jax.default_backend() != "gpu" if interpret is None else interpret
  return _matmul_2d(x, w, tiling, interpret).reshape(*lead, n_out)


@OP.implementation("pallas_triton", BCQArray, platforms=("gpu",))
def lut_gemm_bcq(x, w, act=None):
  """The registered ``lut_gemm`` implementation (module docstring)."""
  return lut_gemm_pallas(x, w, act)


lut_gemm_bcq.path = lambda w, act: None if _refusal(w) else "pallas_triton kernel (binary-coded GEMV)" + suffix(act)
