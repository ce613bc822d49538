"""Pallas Triton (GPU) ``kivi_attention``: flash-decoding over a :class:`~qjax.core.formats.kv.KIVITensor` store
read from its packed codes, then the exact pending tokens.

Shapes and dtypes (the op's contract, :mod:`qjax.kernels.kivi_attention`):
  * ``q [b, t, h, d]`` float32 / bfloat16 / float16, result ``[b, t, h, d]`` in ``q.dtype``; ``h`` a multiple of
    ``kvh``; ``d`` a multiple of 8 up to 256 (tiles use ``d`` rounded up to a power of two, the extra channels
    masked);
  * ``keys``: codes ``[b, kvh, L, d * bits / 8]`` uint8 (little-endian bit stream along ``d``), per channel in
    groups of ``G`` tokens (``scale, mn [b, kvh, L / G, d]``); ``values``: per token in groups of ``G'`` channels
    (``scale, mn [b, kvh, L, d / G']``); ``bits`` 2, 3, 4 or 8 (keys and values each their own), ``G`` and ``G'``
    powers of two, scale / mn float16, bfloat16 or float32 (widened to float32 in the kernel);
  * ``k_pend, v_pend [b, P, kvh, d]`` any float dtype, read in place; ``mask_store [b, t, L]``, ``mask_pend [b, t,
    P]`` (passed as int8), ``length [b]`` (clipped to ``[0, L]``).

Tiling: a grid ``(b, kvh, query blocks, splits)``. A program takes the ``M = Tb * Rp`` query rows of ``Tb`` query
tokens (at most ``64 / Rp``: a longer ``t`` takes several query blocks, each reading the store once) and the ``Rp``
(``h / kvh`` rounded up to a power of two) query heads of one KV head (the wrapper scales ``q`` by ``scale`` and
zero-pads it to that layout; padded rows are masked out), and loops over its split's chunks of ``S`` store tokens
(a power of two, 16..128; a chunk holds whole key groups or lies inside one) only up to ``length[b]``: a dynamic
loop bound, and the tail chunk's loads are masked there, so nothing at or past ``length`` is read. A chunk's key
and value codes are loaded as bytes (3 bits: the 3 bytes of each 8-code block as three strided planes, joined into
a 24-bit word) and unpacked with shifts and masks, then dequantized in float32 with the per-channel key scale / mn
(broadcast over the group's tokens) and the per-token value scale / mn (broadcast over each group's channels), one
chunk at a time; the scores ``[M, S]`` feed an online softmax in float32 (running max
and sum per row) that accumulates ``p . V_hat`` in a float32 ``[M, d]`` accumulator. The last split then runs over
the pending tokens (chunks of up to 64, ``mask_pend``). Each split writes its unnormalized accumulator, row max
and row sum; the wrapper combines the splits (flash-decoding: ``sum_i e^{m_i - m} acc_i / sum_i e^{m_i - m}
l_i``) and restores ``[b, t, h, d]``. Splits: enough for about 256 programs in all, at least 2 chunks each.
Products: bfloat16 / float16 ``q`` use ``dot_general`` on at least 16 rows (query tokens padded) with operands in
``q.dtype`` (the dequantized chunk and the probabilities rounded to it, as the spec rounds them to the pending
dtype) and float32 accumulation; float32 ``q`` uses an elementwise multiply-reduce when ``M <= 8`` and otherwise a
float32 dot (``Precision.HIGHEST``: IEEE, no TF32). Block sizes and split counts are first choices, not yet timed
on a GPU (the tests run the kernel through the interpreter and check its CUDA lowering). Off GPU the same kernel
runs with ``interpret=True``.

Unsupported (``NotImplementedError``, the dispatcher then falls back to the XLA reference): other bit widths,
group sizes that are not powers of two, ``d`` not a multiple of 8 or above 256, more than 128 query heads per KV
head, an empty store or no pending tokens, other query dtypes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from qjax.core.formats.kv import KIVITensor
from qjax.kernels.kivi_attention import OP

__all__ = ["Tiling", "choose_tiling", "kivi_attention_pallas"]

_BITS = (2, 3, 4, 8)
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MAX_D = 256
_NEG = -1e30           # running-max start and masked score (finite: no inf - inf)
_PROGRAMS = 256        # target programs over (b, kvh, query blocks, splits)


def _pow2_ceil(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _pow2_floor(n: int) -> int:
  return 1 << max(0, n.bit_length() - 1)


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Block sizes of one call: ``tb`` query tokens per program, ``chunk`` store tokens and ``pend_chunk`` pending
  tokens per loop step, ``splits`` store splits (flash-decoding), ``dot``: products with ``dot_general`` (else an
  elementwise multiply-reduce); Triton's ``num_warps`` / ``num_stages``."""
  tb: int
  chunk: int
  pend_chunk: int
  splits: int
  dot: bool
  num_warps: int = 4
  num_stages: int = 2


def choose_tiling(b: int, t: int, rep: int, kvh: int, d: int, L: int, P: int, dtype) -> Tiling:
  """Block sizes (module docstring): ``rep = h / kvh`` query heads per KV head."""
  rp, dp = _pow2_ceil(rep), max(8, _pow2_ceil(d))
  m_max = max(64, rp)
  tb = max(1, min(_pow2_ceil(t), m_max // rp))
  dot = dp >= 16 and (jnp.dtype(dtype) != jnp.float32 or tb * rp > 8)
  if dot:
    tb = max(tb, 16 // rp)
    chunk = min(128, max(16, 8192 // dp))
  else:
    chunk = min(128, max(16, _pow2_floor(16384 // (tb * rp * dp))))
  chunk = min(chunk, max(16, _pow2_ceil(L)))
  n_chunks = -(-L // chunk)
  programs = b * kvh * -(-t // tb)
  per_split = max(2, -(-n_chunks // max(1, _PROGRAMS // programs)))
  return Tiling(tb=tb, chunk=chunk, pend_chunk=min(64, max(16, _pow2_ceil(P))), splits=-(-n_chunks // per_split),
                dot=dot)


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernel body needs at trace time."""
  t: int
  tb: int             # query tokens per program
  rp: int             # query heads per KV head, padded to a power of two
  d: int
  dp: int             # d padded to a power of two
  P: int
  k_bits: int
  v_bits: int
  k_group: int        # tokens per key group
  v_group: int        # channels per value group
  k_bytes: int        # packed bytes of a key row
  v_bytes: int
  chunk: int
  pend_chunk: int
  per_split: int      # store chunks per split
  splits: int
  dot: bool
  cdt: str            # dtype of the dot operands

  @property
  def m(self) -> int:
    return self.tb * self.rp


def _iota(n: int) -> jax.Array:
  return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _codes(c_ref, s0, row_ok, bits: int, n_bytes: int, st: _Static) -> jax.Array:
  """float32 codes ``[S, dp]`` of the ``S`` tokens from ``s0`` (rows past the store and channels past ``d`` read 0).

  2/4/8 bits: ``dp * bits / 8`` bytes, code ``j`` of a byte at bit ``bits * j``; 3 bits: ``c_ref`` is the ``[L, d /
  8, 3]`` view, the three bytes of each 8-code block form a 24-bit word whose code ``j`` is at bit ``3 j``."""
  S = st.chunk
  if bits == 3:
    nb = st.dp // 8
    ok = row_ok[:, None] & (_iota(nb) < st.d // 8)[None, :]
    planes = [plt.load(c_ref.at[pl.ds(s0, S), pl.ds(0, nb), jnp.int32(p)], mask=ok, other=0).astype(jnp.int32)
              for p in range(3)]
    words, per = planes[0] | (planes[1] << 8) | (planes[2] << 16), 8
  else:
    nb = st.dp * bits // 8
    ok = row_ok[:, None] & (_iota(nb) < n_bytes)[None, :]
    words, per = plt.load(c_ref.at[pl.ds(s0, S), pl.ds(0, nb)], mask=ok, other=0).astype(jnp.int32), 8 // bits
  if per == 1:
    return words.astype(jnp.float32)
  shifts = jax.lax.broadcasted_iota(jnp.int32, (1, 1, per), 2) * bits
  codes = (words[:, :, None] >> shifts) & ((1 << bits) - 1)
  return codes.reshape(S, st.dp).astype(jnp.float32)


def _key_group_rows(ref, c, length, st: _Static) -> jax.Array:
  """float32 key scale or mn of chunk ``c`` per token: ``[S, dp]`` (whole groups; groups from ``length`` on read
  0) or ``[1, dp]`` (inside one group, which starts below ``length``)."""
  S, G, dp = st.chunk, st.k_group, st.dp
  col_ok = (_iota(dp) < st.d)[None, :]
  if S <= G:
    g = jax.lax.div(c * S, G)
    return plt.load(ref.at[pl.ds(g, 1), pl.ds(0, dp)], mask=col_ok, other=0).astype(jnp.float32)
  ng = S // G
  ok = ((c * ng + _iota(ng)) * G < length)[:, None] & col_ok
  v = plt.load(ref.at[pl.ds(c * ng, ng), pl.ds(0, dp)], mask=ok, other=0).astype(jnp.float32)
  return jnp.broadcast_to(v[:, None, :], (ng, G, dp)).reshape(S, dp)


def _value_group_cols(ref, s0, row_ok, st: _Static) -> jax.Array:
  """float32 value scale or mn of the chunk's tokens per channel: ``[S, dp]`` (or ``[S, 1]``, one group)."""
  S, G, dp = st.chunk, st.v_group, st.dp
  ng = dp // G
  ok = row_ok[:, None] & (_iota(ng) < st.d // G)[None, :]
  v = plt.load(ref.at[pl.ds(s0, S), pl.ds(0, ng)], mask=ok, other=0).astype(jnp.float32)
  return v if ng == 1 else jnp.broadcast_to(v[:, :, None], (S, ng, G)).reshape(S, dp)


def _row_mask(ref, qb, c0, n: int, col_ok, st: _Static) -> jax.Array:
  """bool ``[M, n]``: columns ``c0 ..`` of ``ref [t, *]`` (int8) for the program's query tokens, repeated over
  the ``rp`` heads of each token (padded tokens and columns not ``col_ok``: False)."""
  rows_ok = (qb * st.tb + _iota(st.tb) < st.t)[:, None] & col_ok[None, :]
  m = plt.load(ref.at[pl.ds(qb * st.tb, st.tb), pl.ds(c0, n)], mask=rows_ok, other=0) != 0
  return jnp.broadcast_to(m[:, None, :], (st.tb, st.rp, n)).reshape(st.m, n)


def _scores(q, k, st: _Static) -> jax.Array:
  """``q [M, dp] . k [n, dp] -> [M, n]`` float32."""
  if st.dot:
    prec = jax.lax.Precision.HIGHEST if st.cdt == "float32" else None
    return jax.lax.dot_general(q, k.astype(st.cdt), (((1,), (1,)), ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)
  return jnp.sum(q[:, None, :] * k[None, :, :], axis=2)


def _weighted(p, v, st: _Static) -> jax.Array:
  """``p [M, n] . v [n, dp] -> [M, dp]`` float32."""
  if st.dot:
    prec = jax.lax.Precision.HIGHEST if st.cdt == "float32" else None
    return jax.lax.dot_general(p.astype(st.cdt), v.astype(st.cdt), (((1,), (0,)), ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)
  return jnp.sum(p[:, :, None] * v[None, :, :], axis=1)


def _update(carry, s, visible, v, st: _Static):
  """One online-softmax step: scores ``s [M, n]``, ``visible [M, n]``, values ``v [n, dp]``."""
  m, l, acc = carry
  s = jnp.where(visible, s, _NEG)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
  alpha = jnp.exp(m - m_new)
  return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + _weighted(p, v, st)


def _kernel(len_ref, q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, kp_ref, vp_ref, ms_ref, mp_ref,
            acc_ref, m_ref, l_ref, *, st: _Static):
  """One (row, KV head, query block, split): its store chunks, the pending tokens on the last split."""
  qb, sid = pl.program_id(2), pl.program_id(3)
  length = len_ref[0]
  q = q_ref[...]
  q = q if st.dot else q.astype(jnp.float32)
  S, Pc = st.chunk, st.pend_chunk

  def store_step(c, carry):
    s0 = c * S
    row_ok = s0 + _iota(S) < length                  # nothing at or past length is read (length <= L)
    k = (_codes(kc_ref, s0, row_ok, st.k_bits, st.k_bytes, st) * _key_group_rows(ks_ref, c, length, st)
         + _key_group_rows(km_ref, c, length, st))
    v = (_codes(vc_ref, s0, row_ok, st.v_bits, st.v_bytes, st) * _value_group_cols(vs_ref, s0, row_ok, st)
         + _value_group_cols(vm_ref, s0, row_ok, st))
    visible = _row_mask(ms_ref, qb, s0, S, row_ok, st)
    return _update(carry, _scores(q, k, st), visible, v, st)

  def pend_step(j, carry):
    p0 = j * Pc
    row_ok = p0 + _iota(Pc) < st.P
    ok = row_ok[:, None] & (_iota(st.dp) < st.d)[None, :]
    k = plt.load(kp_ref.at[pl.ds(p0, Pc), pl.ds(0, st.dp)], mask=ok, other=0).astype(jnp.float32)
    v = plt.load(vp_ref.at[pl.ds(p0, Pc), pl.ds(0, st.dp)], mask=ok, other=0).astype(jnp.float32)
    visible = _row_mask(mp_ref, qb, p0, Pc, row_ok, st)
    return _update(carry, _scores(q, k, st), visible, v, st)

  carry = (jnp.full((st.m,), _NEG, jnp.float32), jnp.zeros((st.m,), jnp.float32),
           jnp.zeros((st.m, st.dp), jnp.float32))
  lo = sid * st.per_split
  hi = jnp.minimum(lo + st.per_split, jax.lax.div(length + (S - 1), S))
  carry = jax.lax.fori_loop(lo, hi, store_step, carry)
  n_pend = jnp.where(sid == st.splits - 1, -(-st.P // Pc), 0)
  m, l, acc = jax.lax.fori_loop(0, n_pend, pend_step, carry)
  m_ref[...] = m
  l_ref[...] = l
  acc_ref[...] = acc


def _check(q, keys, values, k_pend, v_pend, mask_store, mask_pend):
  if not isinstance(values, KIVITensor) or not keys.per_channel or values.per_channel:
    raise NotImplementedError("pallas_triton kivi_attention: keys per channel and values per token (KIVITensor)")
  if q.dtype not in _DTYPES:
    raise NotImplementedError(f"pallas_triton kivi_attention: queries of dtype {q.dtype}")
  for x, what in ((keys, "key"), (values, "value")):
    if x.bits not in _BITS:
      raise NotImplementedError(f"pallas_triton kivi_attention: {x.bits}-bit {what} codes (supported: {_BITS})")
    if not _is_pow2(x.group_size):
      raise NotImplementedError(f"pallas_triton kivi_attention: {what} group size {x.group_size} (powers of two)")
    if x.codes.dtype != jnp.uint8:
      raise NotImplementedError(f"pallas_triton kivi_attention: {what} codes of dtype {x.codes.dtype}")
  b, t, h, d = q.shape
  kvh, L = keys.shape[1], keys.shape[2]
  if d % 8 or d > _MAX_D:
    raise NotImplementedError(f"pallas_triton kivi_attention: head_dim {d} (a multiple of 8 up to {_MAX_D})")
  if h % kvh or _pow2_ceil(h // kvh) > 128:
    raise NotImplementedError(f"pallas_triton kivi_attention: {h} query heads over {kvh} KV heads")
  if L == 0 or k_pend.shape[1] == 0 or b == 0 or t == 0:
    raise NotImplementedError("pallas_triton kivi_attention: an empty store, pending window or query")
  if L % keys.group_size or d % values.group_size:
    raise ValueError(f"kivi_attention: {L} store tokens / head_dim {d} do not fit the groups")
  P = k_pend.shape[1]
  if (keys.shape != values.shape or keys.shape != (b, kvh, L, d) or k_pend.shape != (b, P, kvh, d)
      or v_pend.shape != k_pend.shape or mask_store.shape != (b, t, L) or mask_pend.shape != (b, t, P)):
    raise ValueError("kivi_attention: operand shapes do not match (see the op's docstring)")


def kivi_attention_pallas(q, keys: KIVITensor, values: KIVITensor, k_pend, v_pend, mask_store, mask_pend, length,
                          scale, *, tiling: Tiling | None = None, interpret: bool | None = None) -> jax.Array:
  """``kivi_attention`` (:mod:`qjax.kernels.kivi_attention`) with the Triton kernel: ``[b, t, h, d]`` in
  ``q.dtype``. ``tiling``: block sizes (default :func:`choose_tiling`); ``interpret``: run the kernel with the
  Pallas interpreter (default: off GPU). Raises ``NotImplementedError`` for unsupported operands (module
  docstring)."""
  _check(q, keys, values, k_pend, v_pend, mask_store, mask_pend)
  b, t, h, d = q.shape
  kvh, L, P = keys.shape[1], keys.shape[2], k_pend.shape[1]
  rep = h // kvh
  tl_ = tiling or choose_tiling(b, t, rep, kvh, d, L, P, q.dtype)
  rp, dp = _pow2_ceil(rep), max(8, _pow2_ceil(d))
  S = tl_.chunk
  if not all(map(_is_pow2, (tl_.tb, S, tl_.pend_chunk))) or S < 16 or tl_.pend_chunk < 16 or tl_.splits < 1:
    raise ValueError(f"pallas_triton kivi_attention: bad tiling {tl_}")
  if tl_.dot and (tl_.tb * rp < 16 or dp < 16):
    raise ValueError(f"pallas_triton kivi_attention: the dot needs 16 query rows and 16 channels ({tl_})")
  n_chunks = -(-L // S)
  per_split = -(-n_chunks // tl_.splits)
  splits = -(-n_chunks // per_split)
  cdt = jnp.dtype(q.dtype).name if tl_.dot else "float32"
  st = _Static(t=t, tb=tl_.tb, rp=rp, d=d, dp=dp, P=P, k_bits=keys.bits, v_bits=values.bits,
               k_group=keys.group_size, v_group=values.group_size, k_bytes=keys.codes.shape[-1],
               v_bytes=values.codes.shape[-1], chunk=S, pend_chunk=tl_.pend_chunk, per_split=per_split,
               splits=splits, dot=tl_.dot, cdt=cdt)
  nqb = -(-t // st.tb)

  # q scaled, [b, kvh, nqb, M, dp]: row (token i, head r) of block j at i * rp + r; padding zero (masked)
  qs = (q.astype(jnp.float32) * scale).astype(cdt).reshape(b, t, kvh, rep, d)
  qs = jnp.pad(qs, ((0, 0), (0, nqb * st.tb - t), (0, 0), (0, rp - rep), (0, dp - d)))
  qs = qs.reshape(b, nqb, st.tb, kvh, rp, dp).transpose(0, 3, 1, 2, 4, 5).reshape(b, kvh, nqb, st.m, dp)
  three = lambda x: x.codes.reshape(*x.codes.shape[:-1], d // 8, 3) if x.bits == 3 else x.codes
  kc, vc = three(keys), three(values)
  length = jnp.clip(jnp.asarray(length, jnp.int32), 0, L)

  head = lambda a: pl.BlockSpec((None, None, *a.shape[2:]), lambda i, g, j, s: (i, g) + (0,) * (a.ndim - 2))
  pend = pl.BlockSpec((None, P, None, d), lambda i, g, j, s: (i, 0, g, 0))
  mask = lambda a: pl.BlockSpec((None, *a.shape[1:]), lambda i, g, j, s: (i, 0, 0))
  ms, mp = mask_store.astype(jnp.int8), mask_pend.astype(jnp.int8)
  store = [kc, keys.scale, keys.mn, vc, values.scale, values.mn]
  part = lambda *tail: pl.BlockSpec((None, None, None, None, *tail),
                                    lambda i, g, j, s: (i, g, j, s) + (0,) * len(tail))
  acc, m, l = pl.pallas_call(
      functools.partial(_kernel, st=st),
      out_shape=[jax.ShapeDtypeStruct((b, kvh, nqb, splits, st.m, dp), jnp.float32),
                 jax.ShapeDtypeStruct((b, kvh, nqb, splits, st.m), jnp.float32),
                 jax.ShapeDtypeStruct((b, kvh, nqb, splits, st.m), jnp.float32)],
      grid=(b, kvh, nqb, splits),
      in_specs=[pl.BlockSpec((1,), lambda i, g, j, s: (i,)),
                pl.BlockSpec((None, None, None, st.m, dp), lambda i, g, j, s: (i, g, j, 0, 0))]
               + [head(a) for a in store] + [pend, pend, mask(ms), mask(mp)],
      out_specs=[part(st.m, dp), part(st.m), part(st.m)],
      compiler_params=plt.CompilerParams(num_warps=tl_.num_warps, num_stages=tl_.num_stages),
      interpret=jax.default_backend() != "gpu" if interpret is None else interpret,
      name=f"kivi_attention_k{keys.bits}v{values.bits}",
  )(length, qs, *store, k_pend, v_pend, ms, mp)

  # combine the splits: weights e^{m_i - max}, empty splits (l = 0, m = _NEG) weigh nothing
  w = jnp.exp(m - jnp.max(m, axis=3, keepdims=True))
  den = jnp.sum(w * l, axis=3)
  out = jnp.sum(w[..., None] * acc, axis=3) / jnp.where(den > 0, den, 1.0)[..., None]   # [b, kvh, nqb, M, dp]
  out = out.reshape(b, kvh, nqb, st.tb, rp, dp).transpose(0, 2, 3, 1, 4, 5).reshape(b, nqb * st.tb, kvh, rp, dp)
  return out[:, :t, :, :rep, :d].reshape(b, t, h, d).astype(q.dtype)


@OP.implementation("pallas_triton", KIVITensor, platforms=("gpu",))
def pallas_triton(q, keys, values, k_pend, v_pend, mask_store, mask_pend, length, scale):
  """The registered ``kivi_attention`` implementation (:func:`kivi_attention_pallas`, default tiling)."""
  return kivi_attention_pallas(q, keys, values, k_pend, v_pend, mask_store, mask_pend, length, scale)
