"""Pallas Triton (GPU) ``qmatmul`` for :class:`~qjax.core.formats.qarray.QArray` weights: ``x @ W^T``.

Shapes and dtypes:
  * ``x [..., in]`` float32 / bfloat16 / float16 (leading dims flattened to ``M`` rows), result ``[..., out]`` in
    ``x.dtype``, accumulated in float32;
  * ``W``: a QArray ``[out, in]`` with ``bits`` 2, 3, 4 or 8 packed in uint32 words along ``in``
    (``codes [out, ceil(in / 32) * bits]``), ``scale [out, G]`` (any float dtype), ``zero [out, G]`` uint8 or None
    (symmetric: the constant ``2**bits / 2``), per channel or groups (the last group may be partial), and an
    optional act-order ``perm``: the activation columns are permuted once per call (``x[..., perm]``) and the
    natural-order kernel runs on the stored columns (no gathers inside the kernel).

Tiling: a grid over ``(M / bm, out / bn)``; each program loops over ``in`` in blocks of ``bk`` codes (a power of
two >= 32, so a block is whole 32-code packing blocks: ``bk * bits / 32`` words, 3 words per 32 codes for 3 bits,
read through a free ``[out, in / 32, 3]`` view of the words) that either lie inside one group or hold whole groups.
A block's words are unpacked with shifts and masks, the zero is subtracted and the (per group) scale multiplied in
float32, then the ``[bm, bk] x [bn, bk]^T`` product is accumulated in float32: with ``dot_general`` (GEMM, and GEMV
for 4 < M <= 16 on 16 rows), or with an elementwise multiply-reduce for M <= 4 (no 16-row padding of the dot).
Blocks past ``out``, ``in`` or ``M`` are handled by masked loads and a masked store (nothing is padded, the weight
is read in place). Block sizes come from :func:`choose_tiling` (first choices, not yet timed on a GPU: the tests
run the kernel through the interpreter and check its CUDA lowering). Off GPU the same kernel runs with
``interpret=True``.

Unsupported (``NotImplementedError``, the dispatcher then falls back to the XLA reference): other bit widths,
uint8 words (``word_bits=8``), other activation dtypes, and group sizes that are neither a multiple of 32 nor a
power of two (e.g. 48), for which no K block is both packing- and group-aligned.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from qjax.core.formats.qarray import QArray
from qjax.kernels.qmatmul import OP

__all__ = ["Tiling", "choose_tiling", "qmatmul_pallas"]

_BITS = (2, 3, 4, 8)
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_PACK = 32          # codes per packing block (one uint32 word per bit of width)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Block sizes of one call: ``bm`` rows of x, ``bn`` output features, ``bk`` input features (codes) per K step;
  ``reduce``: elementwise multiply-reduce instead of a dot; Triton's ``num_warps`` / ``num_stages``."""
  bm: int
  bn: int
  bk: int
  reduce: bool
  num_warps: int
  num_stages: int


def pow2_ceil(n: int) -> int:
  """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
  return 1 << max(0, (n - 1).bit_length())


def is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _aligned(bk: int, n_in: int, group_size: int) -> bool:
  """Whether K blocks of ``bk`` codes lie inside one group or hold whole power-of-two groups."""
  g = group_size
  return g == -1 or g >= n_in or g % bk == 0 or (is_pow2(g) and bk % g == 0)


def _k_block(n_in: int, group_size: int, cap: int) -> int:
  """The K block (codes): a power of two in ``[32, cap]``, no larger than ``in`` needs, that lies inside one group
  (divides ``group_size``) or holds whole groups (a multiple of a power-of-two ``group_size``)."""
  bk = max(_PACK, min(cap, pow2_ceil(n_in)))
  if _aligned(bk, n_in, group_size):
    return bk
  if group_size % _PACK == 0:
    return min(bk, group_size & -group_size)          # the largest power of two dividing the group (>= 32)
  raise NotImplementedError(
      f"pallas_triton qmatmul: group size {group_size} is neither a multiple of 32 nor a power of two")


def _check_tiling(t: Tiling, n_in: int, group_size: int):
  """An explicit tiling must have power-of-two blocks, ``bk >= 32`` aligned with the groups, and 16-row and
  16-column tiles for the dot."""
  if not all(map(is_pow2, (t.bm, t.bn, t.bk))) or t.bk < _PACK or not _aligned(t.bk, n_in, group_size):
    raise ValueError(f"pallas_triton qmatmul: tiling {t} does not fit group size {group_size} (in {n_in})")
  if not t.reduce and min(t.bm, t.bn) < 16:
    raise ValueError(f"pallas_triton qmatmul: the dot needs bm, bn >= 16, got {t}")


def choose_tiling(m: int, n_out: int, n_in: int, group_size: int) -> Tiling:
  """Block sizes for ``M = m`` rows (see the module docstring).

  * GEMV, ``m <= 16``: memory bound on the weight, so many narrow programs over ``out`` (bn 32-64, for occupancy on
    ~100+ SMs) and long K blocks (fewer loop steps); ``m <= 4`` multiply-reduces a ``[bm, bn, bk]`` tile kept at
    8K elements (64 f32 registers per thread at 4 warps), ``4 < m <= 16`` uses the dot on 16 rows.
  * GEMM, ``m > 16``: tensor-core tiles 64x64 (m <= 64) or 128x128 with bk 64 and 3 pipeline stages, the usual
    Triton matmul shapes that fit shared memory with a dequantized weight tile.
  ``bn`` never exceeds ``out`` rounded up to a power of two (>= 16, the dot's minimum).
  """
  if m <= 4:
    bm = pow2_ceil(m)
    bk = _k_block(n_in, group_size, {1: 256, 2: 128, 4: 64}[bm])
    bn, reduce, warps, stages = min(64, 8192 // (bm * bk)), True, 4, 2
  elif m <= 16:
    bm, bn, reduce, warps, stages = 16, 64, False, 4, 3
    bk = _k_block(n_in, group_size, 128)
  else:
    bm, bn = (64, 64) if m <= 64 else (128, 128)
    reduce, warps, stages = False, 4 if bm == 64 else 8, 3
    bk = _k_block(n_in, group_size, 64)
  bn = max(16, min(bn, pow2_ceil(n_out)))
  return Tiling(bm=bm, bn=bn, bk=bk, reduce=reduce, num_warps=warps, num_stages=stages)


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernel body needs to know at trace time."""
  m: int
  n_out: int
  n_in: int
  bits: int
  group_size: int     # -1: per channel
  n_groups: int
  n_words: int        # packed length of a row (words)
  asym: bool
  tiling: Tiling

  @property
  def groups_per_block(self) -> int:
    g, bk = self.group_size, self.tiling.bk
    return 1 if g == -1 or g >= bk or g >= self.n_in else bk // g


def _iota(n: int, dtype=jnp.int32) -> jax.Array:
  return jax.lax.broadcasted_iota(dtype, (n,), 0)


def _unpack_pow2(words: jax.Array, bits: int) -> jax.Array:
  """``[bn, nw]`` uint32 words (2/4/8 bits) -> ``[bn, nw * 32 / bits]`` int32 codes (code j of a word at bit
  ``bits * j``)."""
  per_word = 32 // bits
  shifts = jax.lax.broadcasted_iota(jnp.uint32, (1, 1, per_word), 2) * jnp.uint32(bits)
  codes = (words[:, :, None] >> shifts) & jnp.uint32((1 << bits) - 1)
  return codes.reshape(words.shape[0], words.shape[1] * per_word).astype(jnp.int32)


def _unpack_3bit(w0: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
  """The 3 words ``[bn, nb]`` of each 32-code block -> ``[bn, nb * 32]`` int32 codes.

  Code ``j`` holds bits ``[3j, 3j + 3)`` of the block's 96-bit little-endian stream; word ``p`` contributes its bits
  ``[3j - 32p, ...)``: shifted right by ``3j - 32p`` when that is >= 0, else left by its negation (codes 10 and 21
  straddle two words), and nothing when the ranges do not overlap (every shift stays in ``[0, 31]``).
  """
  j3 = jax.lax.broadcasted_iota(jnp.int32, (1, 1, _PACK), 2) * 3
  codes = jnp.zeros((*w0.shape, _PACK), jnp.uint32)
  for p, word in enumerate((w0, w1, w2)):
    r = j3 - 32 * p
    overlap = (j3 < 32 * (p + 1)) & (j3 + 3 > 32 * p)
    right = jnp.where(overlap, jnp.maximum(r, 0), 0).astype(jnp.uint32)
    left = jnp.where(overlap, jnp.maximum(-r, 0), 0).astype(jnp.uint32)
    mask = jnp.where(overlap, 7, 0).astype(jnp.uint32)
    codes = codes | (((word[:, :, None] >> right) << left) & mask)
  return codes.reshape(w0.shape[0], w0.shape[1] * _PACK).astype(jnp.int32)


def _codes_tile(c_ref, kb, row_ok: jax.Array, st: _Static) -> jax.Array:
  """Codes ``[bn, bk]`` (int32) of K block ``kb``; words past the row (or rows past ``out``) read as 0."""
  bk = st.tiling.bk
  if st.bits == 3:
    nb = bk // _PACK
    b0 = kb * nb
    ok = row_ok[:, None] & (b0 + _iota(nb) < st.n_words // 3)[None, :]
    words = [plt.load(c_ref.at[:, pl.ds(b0, nb), jnp.int32(p)], mask=ok, other=0) for p in range(3)]
    return _unpack_3bit(*words)
  nw = bk * st.bits // _PACK
  w0 = kb * nw
  ok = row_ok[:, None] & (w0 + _iota(nw) < st.n_words)[None, :]
  return _unpack_pow2(plt.load(c_ref.at[:, pl.ds(w0, nw)], mask=ok, other=0), st.bits)


def _group_tile(ref, kb, row_ok: jax.Array, st: _Static) -> jax.Array:
  """Float32 per-group values (scale or zero) of K block ``kb``: ``[bn, 1]`` when the block lies in one group,
  else ``[bn, bk]`` (each of its ``groups_per_block`` groups repeated over its columns)."""
  bn, bk, ng = st.tiling.bn, st.tiling.bk, st.groups_per_block
  if ng == 1:
    g = 0 if st.group_size == -1 else (kb * bk) // st.group_size
    return plt.load(ref.at[:, pl.ds(g, 1)], mask=row_ok[:, None], other=0).astype(jnp.float32)
  g0 = kb * ng
  ok = row_ok[:, None] & (g0 + _iota(ng) < st.n_groups)[None, :]
  v = plt.load(ref.at[:, pl.ds(g0, ng)], mask=ok, other=0).astype(jnp.float32)
  return jnp.broadcast_to(v[:, :, None], (bn, ng, bk // ng)).reshape(bn, bk)


def _weight_tile(c_ref, s_ref, z_ref, kb, row_ok: jax.Array, st: _Static) -> jax.Array:
  """Dequantized float32 weight ``[bn, bk]``: ``scale * (codes - zero)`` of K block ``kb`` (0 outside ``W``)."""
  codes = _codes_tile(c_ref, kb, row_ok, st).astype(jnp.float32)
  zero = _group_tile(z_ref, kb, row_ok, st) if st.asym else float(2 ** (st.bits - 1))
  return (codes - zero) * _group_tile(s_ref, kb, row_ok, st)


def _kernel(x_ref, c_ref, s_ref, *refs, st: _Static):
  """One ``[bm, bn]`` output tile: ``x [bm, in] @ W[bn, in]^T`` over K blocks, float32 accumulator."""
  z_ref, o_ref = refs if st.asym else (None, refs[0])
  t = st.tiling
  rows = pl.program_id(0) * t.bm + _iota(t.bm)
  cols = pl.program_id(1) * t.bn + _iota(t.bn)
  row_ok, col_ok = rows < st.m, cols < st.n_out

  def step(kb, acc):
    k_ok = kb * t.bk + _iota(t.bk) < st.n_in
    x = plt.load(x_ref.at[:, pl.ds(kb * t.bk, t.bk)], mask=row_ok[:, None] & k_ok[None, :], other=0)
    w = _weight_tile(c_ref, s_ref, z_ref, kb, col_ok, st)
    if t.reduce:
      return acc + jnp.sum(x.astype(jnp.float32)[:, None, :] * w[None, :, :], axis=2)
    prec = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None   # float32 dots default to TF32
    return acc + jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())), precision=prec,
                                     preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, pl.cdiv(st.n_in, t.bk), step, jnp.zeros((t.bm, t.bn), jnp.float32))
  plt.store(o_ref, acc.astype(o_ref.dtype), mask=row_ok[:, None] & col_ok[None, :])


def _check(x: jax.Array, w: QArray):
  if w.bits not in _BITS:
    raise NotImplementedError(f"pallas_triton qmatmul: {w.bits}-bit codes (supported: {_BITS})")
  if w.word_bits != 32 or w.codes.dtype != jnp.uint32:
    raise NotImplementedError("pallas_triton qmatmul: codes must be packed in uint32 words")
  if x.dtype not in _DTYPES:
    raise NotImplementedError(f"pallas_triton qmatmul: activations of dtype {x.dtype}")
  if x.shape[-1] != w.shape[1]:
    raise ValueError(f"qmatmul: x has {x.shape[-1]} input features, the weight {w.shape[1]}")


def _matmul_2d(x: jax.Array, w: QArray, tiling: Tiling, interpret: bool) -> jax.Array:
  """``x [M, in]`` (stored column order) ``@ W^T -> [M, out]`` in ``x.dtype``: one ``pallas_call``."""
  (m, n_in), n_out = x.shape, w.shape[0]
  st = _Static(m=m, n_out=n_out, n_in=n_in, bits=w.bits, group_size=w.group_size, n_groups=w.scale.shape[1],
               n_words=w.codes.shape[1], asym=w.zero is not None, tiling=tiling)
  t = tiling
  codes = w.codes.reshape(n_out, -1, 3) if w.bits == 3 else w.codes   # free view: the 3 words of each block
  by_row = lambda a: pl.BlockSpec((t.bn, *a.shape[1:]), lambda i, j: (j,) + (0,) * (a.ndim - 1))
  weights = [codes, w.scale] + ([w.zero] if st.asym else [])
  return pl.pallas_call(
      functools.partial(_kernel, st=st),
      out_shape=jax.ShapeDtypeStruct((m, n_out), x.dtype),
      grid=(pl.cdiv(m, t.bm), pl.cdiv(n_out, t.bn)),
      in_specs=[pl.BlockSpec((t.bm, n_in), lambda i, j: (i, 0))] + [by_row(a) for a in weights],
      out_specs=pl.BlockSpec((t.bm, t.bn), lambda i, j: (i, j)),
      compiler_params=plt.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
      interpret=interpret,
      name=f"qmatmul_w{w.bits}",
  )(x, *weights)


def qmatmul_pallas(x: jax.Array, w: QArray, *, tiling: Tiling | None = None,
                   interpret: bool | None = None) -> jax.Array:
  """``x [..., in] @ W^T -> [..., out]`` in ``x.dtype`` with the Triton kernel.

  ``tiling``: block sizes (default :func:`choose_tiling`); ``interpret``: run the kernel with the Pallas
  interpreter (default: off GPU). Raises ``NotImplementedError`` for unsupported weights (module docstring).
  """
  _check(x, w)
  lead, (n_out, n_in) = x.shape[:-1], w.shape
  x = x.reshape(-1, n_in)
  if w.perm is not None:
    x = jnp.take(x, w.perm, axis=-1)                                # stored column k is original column perm[k]
  tiling = tiling or choose_tiling(x.shape[0], n_out, n_in, w.group_size)
  _check_tiling(tiling, n_in, w.group_size)
  if x.shape[0] == 0:
    return jnp.zeros((*lead, n_out), x.dtype)
  interpret = jax.default_backend() != "gpu" if interpret is None else interpret
  return _matmul_2d(x, w, tiling, interpret).reshape(*lead, n_out)


@OP.implementation("pallas_triton", QArray, platforms=("gpu",))
def pallas_triton(x, w, act=None):
  """The registered ``qmatmul`` implementation: ``act`` (an activation fake-quantizer) is applied to ``x`` first."""
  if act is not None:
    x = act(x)
  return qmatmul_pallas(x, w)
