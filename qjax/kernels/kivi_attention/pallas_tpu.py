"""Pallas Mosaic TPU ``kivi_attention``: flash decoding over a KIVI store read from its packed codes.

Shapes and dtypes (the op's contract, :mod:`qjax.kernels.kivi_attention`):
  * ``q [b, t, h, d]`` float32 / bfloat16 / float16; result ``[b, t, h, d]`` in ``q.dtype``. Scores, softmax and
    accumulation are float32. The MXU runs bfloat16 x bfloat16 for bfloat16 queries (the dequantized chunk and the
    probabilities rounded to bfloat16, as the spec does) and float32 x float32 (``Precision.HIGHEST``) otherwise
    (float16 queries and pending tokens are widened to float32 in the wrapper);
  * ``keys`` / ``values``: :class:`~qjax.core.formats.kv.KIVITensor` ``[b, kvh, L, d]``, codes uint8 packed along
    ``d``, each with its own ``bits`` (1..8) and group size: keys per channel in groups of ``Gk`` tokens (``scale,
    mn [b, kvh, L / Gk, d]``), values per token in groups of ``Gv`` channels (``scale, mn [b, kvh, L, d / Gv]``),
    float16 / bfloat16 / float32 (read in place, converted to float32 in the kernel);
  * ``k_pend, v_pend [b, P, kvh, d]``, ``mask_store [b, t, L]``, ``mask_pend [b, t, P]`` bool, ``length [b]`` int32.

Layout. The query rows of one KV head are its ``t * h / kvh`` queries (row ``ti * h / kvh + j``: query ``ti``, head
``g * h / kvh + j``), padded to a multiple of 8 rows (16 for bfloat16) that no token is visible to. The packed row
of ``ceil(d / 8) * bits`` bytes of a token is viewed as ``W`` little-endian int32 words (a free bitcast in the
wrapper), so code ``c`` of a token is bits ``[bits * c, bits * c + bits)`` of its word stream: word
``bits * c // 32`` at bit ``bits * c % 32``, spilling into the next word for 3/5/6/7 bits.

Kernel. Grid ``(b, kvh, n_chunks + 1)``, dimension semantics parallel / parallel / arbitrary, the last axis carrying
the online-softmax state (running max ``[rows, 1]``, denominator ``[rows, 1]``, accumulator ``[rows, d]``, float32
VMEM scratch, reset at step 0). Store step ``c`` reads one chunk of ``Lc`` tokens: its words ``[Lc, W]``, key
scales / minima ``[Lc / Gk, d]``, value scales / minima ``[Lc, d / Gv]`` and the ``[t, Lc]`` mask, through
BlockSpecs. It unpacks the words in natural channel order with one lane gather per vreg
(``take_along_axis`` over a 128-lane copy of the words: lane ``c`` takes word ``bits * c // 32``; a second gather
for the spilling codes), a lane-dependent shift and a mask; dequantizes the chunk in VMEM (``K_hat = code * scale
+ mn``, the key scale row of each group broadcast over its ``Gk`` sublanes, the value scale of each channel group
broadcast over its ``Gv`` lanes by the same lane gather); then ``s = scale * q . K_hat^T`` and ``acc += p . V_hat``
on the MXU. The last step reads the pending tokens (``[P', d]``, ``P`` padded to a multiple of 128 and masked) and
writes ``acc / l``. Only the chunk is ever dequantized (in VMEM), never the store: the KIVI algebra of the op's
docstring, with the per-group factors applied to the ``Lc x d`` chunk tile instead of to the query (which would
split the score matmul into one per token group).

Length. ``length`` is a scalar-prefetch operand: chunk steps at or past ``ceil(length / Lc)`` are skipped
(``pl.when``) and their block indices clamped to the last live chunk, so their codes are never fetched; inside the
boundary chunk the tokens at ``>= length`` are masked (scores set to a finite minimum, their probabilities to 0 and
their value scales to 0, so garbage past the end of a partial edge block never reaches the accumulator).

Tiling. ``Lc = L`` when the store fits one chunk (blocks equal to the full dims), else a multiple of
``lcm(128, 8 * Gk)`` (``16 * Gk`` for 16-bit key scales) near :data:`_CHUNK` tokens (512 for ``Gk = 32``), the last
block possibly partial. VMEM per step at ``Lc = 1024`` (``Gk = 64`` with 16-bit scales): ~4 MiB of double-buffered
blocks (the ``[Lc, W]`` words and ``[Lc, d / Gv]`` value scales are lane-padded to 128), a ``[Lc, 128]`` int32
scratch for the gathers and a few ``[Lc, round_up(d, 128)]`` 32-bit temporaries, ~10 MiB in all; the limit is
raised to 32 MiB (``Gk = 128`` with 16-bit scales gives ``Lc = 2048``, about twice that). The ``[t, n]`` masks are
expanded to the query rows with ``t`` selects, or a one-hot matmul for more than 8 queries.

Off TPU (``jax.default_backend() != "tpu"``) the same kernel runs with ``interpret=True``; pass
``interpret=pltpu.InterpretParams(...)`` for TPU interpret mode (uninitialized scratch and out-of-bounds block
padding read as NaN / the integer maximum).

Unsupported (``NotImplementedError``; the dispatcher then runs the spec): query dtypes other than float32 /
bfloat16 / float16; packed rows that are not a whole number of int32 words (``ceil(d / 8) * bits % 4 != 0``) or
wider than 128 words; key groups that are not a multiple of 8 tokens; value groups that do not divide ``d``; scale
dtypes other than float16 / bfloat16 / float32; keys not per channel or values not per token; an empty store
(``L = 0``); more than 512 query rows per KV head; a traced ``scale``. Not verified on hardware: only the Mosaic
lowering is tested here (no TPU); the lane gather (``tpu.dynamic_gather``) needs TPU v4 or newer, and float16
scales rely on Mosaic's float16 -> float32 conversion.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qjax.core.formats.kv import KIVITensor
from qjax.kernels.kivi_attention import OP

__all__ = ["choose_chunk", "kivi_attention_pallas"]

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_SCALE_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
_CHUNK = 512            # target store tokens per grid step
_LANES = 128
_MAX_WORDS = 128        # packed words per token: one vreg of lanes for the gather
_MAX_ROWS = 512         # query rows per KV head
_LOOP_QUERIES = 8       # up to this many queries the [t, n] masks are expanded to rows with selects
_NEG = -1e30            # masked score: finite, so a row that has seen nothing yet keeps m finite
_VMEM_LIMIT = 32 * 2**20


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def choose_chunk(length: int, key_group: int, scale_dtype) -> int:
  """Store tokens per grid step for a store of ``length`` tokens: ``length`` when it fits one chunk, else the
  multiple of ``lcm(128, sub * key_group)`` nearest below :data:`_CHUNK` (at least one), ``sub`` = 8 rows per
  sublane tile for float32 key scales, 16 for 16-bit ones (so the ``[Lc / Gk, d]`` scale block is whole tiles)."""
  unit = _chunk_unit(key_group, scale_dtype)
  chunk = max(unit, _CHUNK // unit * unit)
  return length if length <= chunk else chunk


def _chunk_unit(key_group: int, scale_dtype) -> int:
  sub = 8 if jnp.dtype(scale_dtype).itemsize == 4 else 16
  return math.lcm(_LANES, sub * key_group)


@dataclasses.dataclass(frozen=True)
class _Codes:
  """Static description of one KIVITensor operand: ``bits``, ``group`` size, ``words`` (int32) per token."""
  bits: int
  group: int
  words: int

  @property
  def straddles(self) -> bool:
    return 32 % self.bits != 0


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernel body needs at trace time."""
  t: int                # queries
  r: int                # query heads per KV head
  rows: int             # padded query rows per KV head
  d: int
  chunk: int            # store tokens per step (Lc)
  n_chunks: int
  pend: int             # padded pending tokens
  keys: _Codes
  values: _Codes
  scale: float
  compute: jnp.dtype    # MXU operand dtype
  interpret: bool       # off TPU: XLA:CPU lacks some bfloat16 x bfloat16 -> float32 dots, see :func:`_dot`

  @property
  def lanes(self) -> int:
    """Lanes of the unpacked tiles: ``d`` rounded up to whole vregs."""
    return _round_up(self.d, _LANES)

  @property
  def precision(self):
    return jax.lax.Precision.HIGHEST if self.compute == jnp.float32 else None


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], st: _Static, precision=None) -> jax.Array:
  """``dot_general`` with float32 results contracting dim ``contract[0]`` of ``a`` with ``contract[1]`` of ``b``.
  Interpreted on CPU, bfloat16 operands are widened to float32 first (exact; the same products and float32 sums as
  the MXU) since XLA:CPU rejects some bfloat16 x bfloat16 -> float32 dots."""
  if st.interpret and a.dtype == jnp.bfloat16:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def _lanes_of(x: jax.Array, pad_ref) -> jax.Array:
  """``x [n, w]`` int32 (``w <= 128``) widened to one whole vreg of lanes, ``[n, 128]``, through the scratch
  ``pad_ref`` (the lane gather reads a full vreg per row; lanes ``>= w`` are never indexed)."""
  pad_ref[:, :x.shape[1]] = x
  return pad_ref[...]


def _take_lanes(src: jax.Array, idx: jax.Array) -> jax.Array:
  """``out[n, j] = src[n, idx[n, j]]``: one lane gather (``tpu.dynamic_gather``) per vreg."""
  return jnp.take_along_axis(src, idx, axis=1, mode="promise_in_bounds")


def _lane_iota(st: _Static) -> jax.Array:
  """``[1, lanes]`` int32 lane (channel) index; the per-lane constants below are computed on this one row and
  broadcast over the chunk's sublanes."""
  return jax.lax.broadcasted_iota(jnp.int32, (1, st.lanes), 1)


def _unpack(words: jax.Array, pad_ref, spec: _Codes, st: _Static) -> jax.Array:
  """float32 codes ``[n, d]`` in natural channel order from the int32 words ``[n, W]`` (little-endian stream)."""
  shape = (words.shape[0], st.lanes)
  c = _lane_iota(st)
  bit = c * spec.bits
  word = jnp.where(c < st.d, bit >> 5, 0)                   # lanes >= d read word 0 (sliced off)
  off = bit & 31
  src = _lanes_of(words, pad_ref)
  code = jax.lax.shift_right_logical(_take_lanes(src, jnp.broadcast_to(word, shape)), off)
  if spec.straddles:                                        # the high bits of a code that spills into word + 1
    spill = (off + spec.bits > 32) & (c < st.d)
    hi = _take_lanes(src, jnp.broadcast_to(jnp.where(spill, word + 1, word), shape))
    code = code | jnp.where(spill, jax.lax.shift_left(hi, (32 - off) & 31), 0)
  code = code & ((1 << spec.bits) - 1)
  return code[:, :st.d].astype(jnp.float32)


def _expand_channel_groups(x: jax.Array, pad_ref, st: _Static) -> jax.Array:
  """``[n, d / Gv]`` float32 -> ``[n, d]``: each value broadcast over its ``Gv`` channels (a lane gather)."""
  n, groups = x.shape
  if groups == 1:
    return jnp.broadcast_to(x, (n, st.d))
  c = _lane_iota(st)
  idx = functools.reduce(jnp.add, [(c >= j * st.values.group).astype(jnp.int32) for j in range(1, groups)])
  idx = jnp.where(c < st.d, idx, 0)
  src = _lanes_of(jax.lax.bitcast_convert_type(x, jnp.int32), pad_ref)
  out = _take_lanes(src, jnp.broadcast_to(idx, (n, st.lanes)))
  return jax.lax.bitcast_convert_type(out[:, :st.d], jnp.float32)


def _row_mask(mask_ref, st: _Static) -> jax.Array:
  """The ``[t, n]`` int32 mask block expanded to the ``[rows, n]`` query rows (padding rows: False)."""
  n = mask_ref.shape[-1]
  if st.t == 1:
    m = jnp.broadcast_to(mask_ref[0:1, :], (st.rows, n))
    row = jax.lax.broadcasted_iota(jnp.int32, (st.rows, n), 0)
    return (m != 0) & (row < st.r)
  if st.t <= _LOOP_QUERIES:
    row = jax.lax.broadcasted_iota(jnp.int32, (st.rows, n), 0)
    out = jnp.zeros((st.rows, n), jnp.int32)
    for ti in range(st.t):
      out = jnp.where((row >= ti * st.r) & (row < (ti + 1) * st.r), mask_ref[ti:ti + 1, :], out)
    return out != 0
  row = jax.lax.broadcasted_iota(jnp.int32, (st.rows, st.t), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (st.rows, st.t), 1)
  onehot = jnp.where((row >= col * st.r) & (row < col * st.r + st.r), 1.0, 0.0)
  return _dot(onehot, mask_ref[...].astype(jnp.float32), (1, 0), st) > 0.5


def _attend(s, vis, v, m_ref, l_ref, acc_ref, st: _Static):
  """One online-softmax step: scores ``s [rows, n]`` (float32, scaled), visibility ``vis``, values ``v [n, d]``."""
  s = jnp.where(vis, s, _NEG)
  m_prev = m_ref[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
  l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
  acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(st.compute), v.astype(st.compute), (1, 0), st, st.precision)
  m_ref[...] = m_new


def _scores(q_ref, k: jax.Array, st: _Static) -> jax.Array:
  """``scale * q . k^T``: ``[rows, n]`` float32 for ``k [n, d]``."""
  q = q_ref[...].astype(st.compute)
  return _dot(q, k.astype(st.compute), (1, 1), st, st.precision) * st.scale


def _kernel(len_ref, q_ref, kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref, ms_ref, kp_ref, vp_ref, mp_ref,
            o_ref, m_ref, l_ref, acc_ref, pad_ref, *, st: _Static):
  """Step ``c < n_chunks``: store chunk ``c`` (skipped at or past ``length``); step ``n_chunks``: the pending
  tokens and the output."""
  c = pl.program_id(2)
  length = len_ref[pl.program_id(0)]
  start = c * st.chunk

  @pl.when(c == 0)
  def _():
    m_ref[...] = jnp.full_like(m_ref, _NEG)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when((c < st.n_chunks) & (start < length))
  def _():
    n, g = st.chunk, st.keys.group
    codes = _unpack(kc_ref[...], pad_ref, st.keys, st)                       # [Lc, d]
    ks, km = ks_ref[...].astype(jnp.float32), km_ref[...].astype(jnp.float32)  # [Lc / Gk, d]
    parts = [codes[j * g:(j + 1) * g] * ks[j:j + 1] + km[j:j + 1] for j in range(n // g)]
    k = jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    pos = start + jax.lax.broadcasted_iota(jnp.int32, (st.rows, n), 1)
    vis = _row_mask(ms_ref, st) & (pos < length)

    live = (start + jax.lax.broadcasted_iota(jnp.int32, vs_ref.shape, 0)) < length
    vs = jnp.where(live, vs_ref[...].astype(jnp.float32), 0.0)               # [Lc, d / Gv]; 0 past length
    vm = jnp.where(live, vm_ref[...].astype(jnp.float32), 0.0)
    codes = _unpack(vc_ref[...], pad_ref, st.values, st)
    v = codes * _expand_channel_groups(vs, pad_ref, st) + _expand_channel_groups(vm, pad_ref, st)
    _attend(_scores(q_ref, k, st), vis, v, m_ref, l_ref, acc_ref, st)

  @pl.when(c == st.n_chunks)
  def _():
    _attend(_scores(q_ref, kp_ref[...], st), _row_mask(mp_ref, st), vp_ref[...], m_ref, l_ref, acc_ref, st)
    l = l_ref[...]
    o_ref[...] = acc_ref[...] / jnp.where(l > 0, l, 1.0)


def _codes_spec(x: KIVITensor, what: str, per_channel: bool) -> _Codes:
  if not isinstance(x, KIVITensor):
    raise NotImplementedError(f"pallas_tpu kivi_attention: {what} of type {type(x).__name__}")
  if x.per_channel != per_channel:
    raise NotImplementedError(f"pallas_tpu kivi_attention: {what} quantized per "
                              f"{'channel' if x.per_channel else 'token'}")
  if x.codes.dtype != jnp.uint8:
    raise NotImplementedError(f"pallas_tpu kivi_attention: {what} codes of dtype {x.codes.dtype}")
  for a in (x.scale, x.mn):
    if a.dtype not in _SCALE_DTYPES:
      raise NotImplementedError(f"pallas_tpu kivi_attention: {what} scales of dtype {a.dtype}")
  n_bytes = x.codes.shape[-1]
  if n_bytes % 4 or n_bytes // 4 > _MAX_WORDS:
    raise NotImplementedError(f"pallas_tpu kivi_attention: {what} rows of {n_bytes} packed bytes (need a multiple of "
                              f"4, at most {4 * _MAX_WORDS})")
  if per_channel and x.group_size % 8:
    raise NotImplementedError(f"pallas_tpu kivi_attention: key groups of {x.group_size} tokens (need a multiple "
                              "of 8)")
  if not per_channel and x.head_dim % x.group_size:
    raise NotImplementedError(f"pallas_tpu kivi_attention: value groups of {x.group_size} channels do not divide "
                              f"head_dim {x.head_dim}")
  return _Codes(bits=x.bits, group=x.group_size, words=n_bytes // 4)


def _words(x: KIVITensor) -> jax.Array:
  """uint8 codes ``[b, kvh, L, 4 W]`` viewed as little-endian int32 words ``[b, kvh, L, W]``."""
  codes = x.codes.reshape(*x.codes.shape[:-1], -1, 4)
  return jax.lax.bitcast_convert_type(codes, jnp.int32)


def kivi_attention_pallas(q, keys: KIVITensor, values: KIVITensor, k_pend, v_pend, mask_store, mask_pend, length,
                          scale: float, *, chunk: int | None = None, interpret=None) -> jax.Array:
  """``kivi_attention`` (module docstring) with the Mosaic TPU kernel: ``[b, t, h, d]`` in ``q.dtype``.

  ``chunk``: store tokens per grid step (default :func:`choose_chunk`; else ``L`` or a multiple of
  ``lcm(128, 8 * Gk)``, ``16 * Gk`` for 16-bit key scales); ``interpret``: passed to ``pallas_call`` (``True``, or a
  :class:`~jax.experimental.pallas.tpu.InterpretParams`; default: ``True`` off TPU). Raises
  ``NotImplementedError`` for unsupported operands (module docstring).
  """
  if q.dtype not in _DTYPES:
    raise NotImplementedError(f"pallas_tpu kivi_attention: queries of dtype {q.dtype}")
  kspec = _codes_spec(keys, "keys", per_channel=True)
  vspec = _codes_spec(values, "values", per_channel=False)
  try:
    scale = float(scale)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise NotImplementedError("pallas_tpu kivi_attention: a traced scale") from e
  b, t, h, d = q.shape
  _, kvh, L, _ = keys.shape
  P = k_pend.shape[1]
  if keys.shape != values.shape or keys.head_dim != d or h % kvh or k_pend.shape != (b, P, kvh, d):
    raise ValueError(f"kivi_attention: q {q.shape}, keys {keys.shape}, values {values.shape}, k_pend "
                     f"{k_pend.shape} do not match")
  if v_pend.shape != k_pend.shape or mask_store.shape != (b, t, L) or mask_pend.shape != (b, t, P):
    raise ValueError(f"kivi_attention: v_pend {v_pend.shape}, mask_store {mask_store.shape}, mask_pend "
                     f"{mask_pend.shape} do not match q {q.shape} and the store of {L} tokens")
  if L == 0:
    raise NotImplementedError("pallas_tpu kivi_attention: an empty store")
  r = h // kvh
  compute = jnp.dtype(jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32)
  rows = _round_up(t * r, 16 if compute == jnp.bfloat16 else 8)
  if rows > _MAX_ROWS:
    raise NotImplementedError(f"pallas_tpu kivi_attention: {t * r} query rows per KV head (at most {_MAX_ROWS})")

  unit = _chunk_unit(kspec.group, keys.scale.dtype)
  if chunk is None:
    chunk = choose_chunk(L, kspec.group, keys.scale.dtype)
  elif chunk < L and chunk % unit:
    raise ValueError(f"kivi_attention: chunk {chunk} is neither >= L = {L} nor a multiple of {unit}")
  chunk = min(chunk, L)
  n_chunks = -(-L // chunk)
  pend = max(_round_up(P, _LANES), _LANES)
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  st = _Static(t=t, r=r, rows=rows, d=d, chunk=chunk, n_chunks=n_chunks, pend=pend, keys=kspec, values=vspec,
               scale=scale, compute=compute, interpret=interpret is not None and interpret is not False)

  qr = q.reshape(b, t, kvh, r, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * r, d).astype(jnp.float32)
  qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rows - t * r), (0, 0)))
  pend_kv = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2).astype(compute), ((0, 0), (0, 0), (0, pend - P), (0, 0)))
  mp = jnp.pad(mask_pend.astype(jnp.int32), ((0, 0), (0, 0), (0, pend - P)))
  length = jnp.clip(length.astype(jnp.int32), 0, L)

  def chunk_of(i, c, len_ref):      # the step's chunk, clamped to the last live one (no fetch past length)
    last = jnp.maximum((len_ref[i] + chunk - 1) // chunk - 1, 0)
    return jnp.minimum(c, last)

  head = lambda i, g, c, len_ref: (i, g, 0, 0)
  store = lambda i, g, c, len_ref: (i, g, chunk_of(i, c, len_ref), 0)
  n_groups = values.scale.shape[-1]
  in_specs = [
      pl.BlockSpec((None, None, rows, d), head),                              # q rows
      pl.BlockSpec((None, None, chunk, kspec.words), store),                  # key words
      pl.BlockSpec((None, None, chunk // kspec.group, d), store),             # key scale
      pl.BlockSpec((None, None, chunk // kspec.group, d), store),             # key mn
      pl.BlockSpec((None, None, chunk, vspec.words), store),                  # value words
      pl.BlockSpec((None, None, chunk, n_groups), store),                     # value scale
      pl.BlockSpec((None, None, chunk, n_groups), store),                     # value mn
      pl.BlockSpec((None, t, chunk), lambda i, g, c, len_ref: (i, 0, chunk_of(i, c, len_ref))),   # mask_store
      pl.BlockSpec((None, None, pend, d), head),                              # k_pend
      pl.BlockSpec((None, None, pend, d), head),                              # v_pend
      pl.BlockSpec((None, t, pend), lambda i, g, c, len_ref: (i, 0, 0)),      # mask_pend
  ]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, kvh, n_chunks + 1), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, rows, d), head),
      scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                      pltpu.VMEM((rows, d), jnp.float32), pltpu.VMEM((chunk, _LANES), jnp.int32)])
  operands = [qr, _words(keys), keys.scale, keys.mn, _words(values), values.scale, values.mn,
              mask_store.astype(jnp.int32), pend_kv(k_pend), pend_kv(v_pend), mp]
  tokens = L + pend
  cost = pl.CostEstimate(flops=4 * b * kvh * rows * tokens * d, transcendentals=b * kvh * rows * tokens,
                         bytes_accessed=int(sum(x.size * x.dtype.itemsize for x in operands) + qr.size * 4))
  out = pl.pallas_call(
      functools.partial(_kernel, st=st),
      out_shape=jax.ShapeDtypeStruct((b, kvh, rows, d), jnp.float32),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=_VMEM_LIMIT),
      interpret=interpret,
      cost_estimate=cost,
      name=f"kivi_attention_k{kspec.bits}v{vspec.bits}",
  )(length, *operands)
  out = out[:, :, :t * r].reshape(b, kvh, t, r, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, t, h, d).astype(q.dtype)


@OP.implementation("pallas_tpu", KIVITensor, platforms=("tpu",))
def pallas_tpu(q, keys, values, k_pend, v_pend, mask_store, mask_pend, length, scale):
  """The registered ``kivi_attention`` implementation (:func:`kivi_attention_pallas` with its defaults)."""
  return kivi_attention_pallas(q, keys, values, k_pend, v_pend, mask_store, mask_pend, length, scale)
