"""Pallas Mosaic TPU ``qmatmul`` for :class:`~qjax.core.formats.qarray.QArray` weights: ``x @ W^T``.

Shapes and dtypes:
  * ``x [..., in]`` float32 / bfloat16 / float16 (leading dims flattened to ``M`` rows), result ``[..., out]`` in
    ``x.dtype``, accumulated in float32. The MXU runs bfloat16 x bfloat16 for bfloat16 activations and float32 x
    float32 (``Precision.HIGHEST``) for float32 and float16 ones (float16 is widened to float32 first);
  * ``W``: a QArray ``[out, in]`` with ``bits`` 2..8 (2, 3, 4 and 8 are tested) packed in uint32 words along ``in``
    (``codes [out, P = ceil(in / 32) * bits]``), ``scale [out, G]`` (float16 / bfloat16 / float32), ``zero [out,
    G]`` uint8 or None (symmetric: the constant ``2**bits / 2``), per channel or groups of a multiple of 32 columns
    (the last group may be partial), and an optional act-order ``perm``. The weight arrays are read in place (never
    padded or re-laid out per call).

Layout trick (the one per-call rearrangement is on the activations): word ``p`` of a row holds up to ``S`` bit
fields ("slots"; ``S = 32 / bits`` for 2/4/8 bits, 12 for 3 bits, whose codes 10 and 21 straddle two words and are
split into a low and a high field). Unpacking slot ``s`` of a ``[tn, tkw]`` tile of words is one shift and one mask
(lane-dependent for 3 bits, where the field depends on ``p mod 3``) and yields a ``[tn, tkw]`` tile whose lane ``p``
is one code (or part of one). Instead of interleaving the slots back into column order inside the kernel, the
wrapper gathers the activation columns once per call into the matching slot-major order ``x' [M, nK * S * tkw]``
(the act-order ``perm`` is composed into that gather; a straddling code's column appears twice, once per field, the
high field weighted ``2**lsh`` and carrying no zero point; padding and empty slots gather zeros). The contraction
order over ``in`` is irrelevant to the product, so the kernel writes each dequantized slot tile (compute dtype) at
lane offset ``s * stride`` of a VMEM scratch ``[tn, S * stride]`` and runs one MXU ``dot_general`` of the ``x'``
tile against it (``stride = tkw`` rounded up to 128 lanes, so every slot starts on a vreg boundary).

Tiling: a grid ``(M / tm, out / tn, nK)``, dimension semantics parallel / parallel / arbitrary, a float32 VMEM
accumulator ``[tm, tn]`` zeroed at the first K step and written out (cast) at the last.
  * K tiles of ``tk = 4096`` codes = ``tkw = 128 * bits`` words (a multiple of 128 lanes and of the 3-word packing
    block), or the whole row when ``P <= 128 * bits`` (block = full array dim);
  * ``tn``: 512 (bits <= 4) / 256 / 128 when it divides ``out``, else the whole ``out`` up to 512, else 256 with a
    partial last block (its rows past ``out`` only feed output columns that are sliced off);
  * ``tm``: ``M`` rounded up to 8 (16 for bfloat16), at most 256; ``x'`` is zero-padded to whole tiles.
  VMEM at the largest tiles (tm 256, tn 512, float32): ~9 MiB for the dequantized ``[tn, S * stride]`` scratch,
  ~9 MiB for the double-buffered ``x'`` tiles, a few MiB of codes and temporaries; the limit is raised to 48 MiB.
Group scales: the ``[tn, G]`` scale / zero block (``G`` lanes, or 128-group blocks indexed by the K step when
``G > 128``) stays in VMEM; the per-lane scale of a K tile is ``scale_block @ onehot[GB, tkw]`` on the MXU (Mosaic
cannot gather or repeat along lanes), exact because the scale is split into 1-3 bfloat16 parts (float16: 2) and
the one-hot has a single 1 per column; the zero point (< 256) is exact in one bfloat16 pass. Per channel, the
``[tn, 1]`` scale is broadcast. Off TPU (``jax.default_backend() != "tpu"``) the same kernel runs with
``interpret=True`` (uninitialized scratch and the padding of partial edge blocks read as NaN / the integer minimum,
so a kernel relying on them fails its tests; TPU interpret mode, ``interpret=pltpu.InterpretParams()``, gives the
same results but compiles ~3x slower on CPU).

Unsupported (``NotImplementedError``; the dispatcher then falls back to the XLA reference): uint8 words
(``word_bits=8``), group sizes that are not a multiple of 32 (a word's codes would span two groups), activations
of other dtypes. Cost note: the group expansion adds 2-4 small matmuls ``[tn, GB] @ [GB, tkw]`` per weight tile
(``GB <= 128``); it would disappear with a one-time repack to the HF GPTQ orientation, codes ``[P, out]`` and
scales ``[G, out]``, where a group's scale row broadcasts along sublanes over its ``g * bits / 32`` word rows
(tile-aligned when that is a multiple of 8, e.g. 4 bits with g >= 64).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qjax.core.formats.qarray import QArray
from qjax.kernels.qmatmul import OP

__all__ = ["Tiling", "choose_tiling", "qmatmul_pallas", "slot_table"]

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_PACK = 32              # codes per packing block (``bits`` uint32 words)
_TK = 4096              # codes per K tile
_SCALE_BLOCK = 128      # groups per scale block when a row has more groups
_TN_FULL_MAX = 512      # an ``out`` that no 128-multiple tile divides is one tile up to this size
_VMEM_LIMIT = 48 * 2**20


@dataclasses.dataclass(frozen=True)
class Part:
  """One bit field of a word: bits ``[off, off + nbits)`` hold bits ``[lsh, lsh + nbits)`` of code ``j`` of the
  word's 32-code block; ``low``: the field holds the code's lowest bit (it carries the zero point)."""
  j: int
  off: int
  nbits: int
  lsh: int
  low: bool


@functools.lru_cache(maxsize=None)
def slot_table(bits: int) -> tuple[tuple[Part | None, ...], ...]:
  """``table[r][s]``: the field in slot ``s`` of word ``r`` (``0 <= r < bits``) of a packing block, None where
  word ``r`` has fewer fields than the widest word (all words have ``S = len(table[0])`` slots)."""
  words = []
  for r in range(bits):
    lo, hi = _PACK * r, _PACK * (r + 1)
    fields = []
    for j in range(_PACK):
      a, b = bits * j, bits * (j + 1)
      s, e = max(a, lo), min(b, hi)
      if s < e:
        fields.append(Part(j=j, off=s - lo, nbits=e - s, lsh=s - a, low=s == a))
    words.append(fields)
  n = max(len(f) for f in words)
  return tuple(tuple(f) + (None,) * (n - len(f)) for f in words)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Block sizes of one call: ``tm`` rows, ``tn`` output features, ``tkw`` words (``tk`` codes) per K step, ``nk``
  K steps, ``gb`` groups per scale block (``tiled``: the block moves with the K step) and ``stride``: lanes of one
  slot in ``x'`` (``tkw`` rounded up to 128, so every slot starts on a vreg boundary), for ``bits``-bit codes."""
  tm: int
  tn: int
  tkw: int
  nk: int
  gb: int
  tiled: bool
  bits: int

  @property
  def tk(self) -> int:
    return self.tkw * _PACK // self.bits

  @property
  def stride(self) -> int:
    return -(-self.tkw // 128) * 128


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _out_tile(n_out: int, bits: int) -> int:
  for tn in (512, 256, 128):
    if n_out % tn == 0 and (tn < 512 or bits <= 4):
      return tn
  return n_out if n_out <= _TN_FULL_MAX else 256


def choose_tiling(m: int, n_out: int, n_in: int, bits: int, group_size: int, dtype) -> Tiling:
  """The tiles of an ``[m, n_in] @ [n_out, n_in]^T`` call (see the module docstring)."""
  words = -(-n_in // _PACK) * bits
  tkw = words if words <= _TK * bits // _PACK else _TK * bits // _PACK
  n_groups = 1 if group_size == -1 else -(-n_in // group_size)
  tiled = n_groups > _SCALE_BLOCK
  align = 16 if jnp.dtype(dtype) == jnp.bfloat16 else 8
  return Tiling(tm=min(256, _round_up(m, align)), tn=_out_tile(n_out, bits), tkw=tkw, nk=-(-words // tkw),
                gb=_SCALE_BLOCK if tiled else n_groups, tiled=tiled, bits=bits)


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernel body needs at trace time."""
  tiling: Tiling
  group_size: int       # -1: per channel
  n_groups: int
  asym: bool
  scale_parts: int      # bfloat16 parts that represent a scale exactly
  compute: jnp.dtype    # MXU operand dtype
  interpret: bool       # off TPU: XLA:CPU lacks some bfloat16 x bfloat16 -> float32 dots, see :func:`_dot`

  @property
  def table(self):
    return slot_table(self.tiling.bits)


def _lane_values(values, r, dtype):
  """A per-lane constant: ``values[r]`` for the lane's word position ``r`` (``[1, tkw]`` int32), or a scalar when
  every word position has the same value."""
  if all(v == values[0] for v in values):
    return jnp.asarray(values[0], dtype)
  out = jnp.full(r.shape, values[-1], dtype)
  for i, v in enumerate(values[:-1]):
    out = jnp.where(r == i, jnp.asarray(v, dtype), out)
  return out


def _dequant_slot(words, r, s: int, scale, zero, st: _Static) -> jax.Array:
  """Float32 ``[tn, tkw]`` weights of slot ``s`` of the word tile ``words [tn, tkw]``: ``scale * (field * 2**lsh -
  zero)``, the zero only on low fields (0 on empty slots)."""
  parts = [st.table[w][s] for w in range(st.tiling.bits)]
  off = _lane_values([p.off if p else 0 for p in parts], r, jnp.uint32)
  mask = _lane_values([(1 << p.nbits) - 1 if p else 0 for p in parts], r, jnp.uint32)
  q = (words >> off) & mask
  if any(p and p.lsh for p in parts):
    q = q << _lane_values([p.lsh if p else 0 for p in parts], r, jnp.uint32)
  q = q.astype(jnp.int32).astype(jnp.float32)     # < 256: the signed conversion is exact
  low = [1.0 if p and p.low else 0.0 for p in parts]
  if all(v == 1.0 for v in low):
    return scale * (q - zero)
  return scale * (q - _lane_values(low, r, jnp.float32) * zero)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], st: _Static, precision=None) -> jax.Array:
  """``dot_general`` with float32 results contracting dim ``contract[0]`` of ``a`` with ``contract[1]`` of ``b``.
  Interpreted on CPU, bfloat16 operands are widened to float32 first (exact; the same products and float32 sums as
  the MXU) since XLA:CPU rejects some bfloat16 x bfloat16 -> float32 dots (``DotThunk``)."""
  if st.interpret and a.dtype == jnp.bfloat16:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def _bf16_parts(v: jax.Array, n: int) -> list[jax.Array]:
  """``n`` bfloat16 arrays whose float32 sum is ``v`` (exact for ``8 * n`` significant bits)."""
  parts = []
  for _ in range(n):
    p = v.astype(jnp.bfloat16)
    parts.append(p)
    v = v - p.astype(jnp.float32)
  return parts


def _expand_groups(lanes_ref, s_ref, z_ref, k, st: _Static):
  """The K tile's float32 scale and zero per lane, ``[tn, tkw]`` (``[tn, 1]`` per channel; the zero is a Python
  float when symmetric)."""
  zero = float(2 ** (st.tiling.bits - 1))
  if st.n_groups == 1:
    if st.asym:
      zero = z_ref[...].astype(jnp.int32).astype(jnp.float32)
    return s_ref[...].astype(jnp.float32), zero
  t, g = st.tiling, st.group_size
  base = jax.lax.div(k * t.tk, t.gb * g) * t.gb if t.tiled else 0     # first group of the scale block
  code = k * t.tk - base * g + lanes_ref[0:1, :]                       # block-relative first code of each word
  d = code - jax.lax.broadcasted_iota(jnp.int32, (t.gb, t.tkw), 0) * g
  onehot = jnp.where((d >= 0) & (d < g), 1.0, 0.0).astype(jnp.bfloat16)          # [gb, tkw]
  expand = lambda v: _dot(v, onehot, (1, 0), st)
  s = s_ref[...].astype(jnp.float32)
  if t.tiled and st.n_groups % t.gb:                                   # lanes past G of the last block: garbage
    s = jnp.where(jax.lax.broadcasted_iota(jnp.int32, s.shape, 1) < st.n_groups - base, s, 0.0)
  scale = functools.reduce(jnp.add, [expand(p) for p in _bf16_parts(s, st.scale_parts)])
  if st.asym:
    zero = expand(z_ref[...].astype(jnp.int32).astype(jnp.float32).astype(jnp.bfloat16))
  return scale, zero


def _kernel(lanes_ref, x_ref, c_ref, s_ref, *refs, st: _Static):
  """One K step of the ``[tm, tn]`` output tile: ``acc += x'[tm, S * tkw] @ dequant(words [tn, tkw])^T``."""
  z_ref, o_ref, acc_ref, w_ref = refs if st.asym else (None, *refs)
  t = st.tiling
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  scale, zero = _expand_groups(lanes_ref, s_ref, z_ref, k, st)
  words = c_ref[...]
  r = lanes_ref[1:2, :]
  precision = jax.lax.Precision.HIGHEST if st.compute == jnp.float32 else None
  if t.stride != t.tkw:
    @pl.when(k == 0)
    def _():
      w_ref[...] = jnp.zeros_like(w_ref)       # the lanes between slots stay 0 (x' is 0 there too)
  for s in range(len(st.table[0])):
    w_ref[:, s * t.stride:s * t.stride + t.tkw] = _dequant_slot(words, r, s, scale, zero, st).astype(st.compute)
  acc_ref[...] += _dot(x_ref[...], w_ref[...], (1, 1), st, precision)

  @pl.when(k == t.nk - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.lru_cache(maxsize=64)
def _x_index(n_in: int, t: Tiling) -> np.ndarray:
  """Stored column of every ``x'`` lane (``n_in``: a zero), ``[nk * S * stride]``: K tile ``k``, slot ``s``, lane
  ``p`` is the code in slot ``s`` of word ``k * tkw + p``."""
  table = slot_table(t.bits)
  n_slots = len(table[0])
  idx = np.full((t.nk, n_slots, t.stride), n_in, np.int32)
  word = np.arange(t.nk)[:, None] * t.tkw + np.arange(t.tkw)[None, :]               # [nk, tkw]
  block, r = word // t.bits, word % t.bits
  for s in range(n_slots):
    for w in range(t.bits):
      part = table[w][s]
      if part is not None:
        code = block * _PACK + part.j
        idx[:, s, :t.tkw] = np.where((r == w) & (code < n_in), code, idx[:, s, :t.tkw])
  return idx.reshape(-1)


@functools.lru_cache(maxsize=64)
def _lanes(t: Tiling) -> np.ndarray:
  """``[2, tkw]`` int32: row 0 the tile-relative first code of each word, row 1 its position in the packing block."""
  p = np.arange(t.tkw)
  return np.stack([p * _PACK // t.bits, p % t.bits]).astype(np.int32)


def _slot_major(x: jax.Array, t: Tiling) -> jax.Array:
  """``x [Mp, in]`` -> ``x'`` for 2/4/8 bits without a gather: lane ``p`` of slot ``s`` of K tile ``k`` is column
  ``k * tk + p * S + s`` (``S = 32 / bits`` codes per word), i.e. a pad, a reshape and a transpose."""
  n_slots = _PACK // t.bits
  x = jnp.pad(x, ((0, 0), (0, t.nk * t.tk - x.shape[1])))
  x = x.reshape(x.shape[0], t.nk, t.tkw, n_slots).transpose(0, 1, 3, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, t.stride - t.tkw))).reshape(x.shape[0], -1)


def _arrange(x: jax.Array, perm, n_in: int, t: Tiling, dtype) -> jax.Array:
  """``x [M, in]`` (original column order) -> ``x' [Mp, nk * S * stride]`` in ``dtype``, rows padded to whole ``tm``
  tiles: one gather of the columns :func:`_x_index` names, composed with the act-order ``perm`` (stored column k is
  original column ``perm[k]``), or :func:`_slot_major` for 2/4/8 bits in natural order."""
  x = jnp.pad(x.astype(dtype), ((0, _round_up(x.shape[0], t.tm) - x.shape[0]), (0, 0)))
  if perm is None and _PACK % t.bits == 0:
    return _slot_major(x, t)
  idx = _x_index(n_in, t)
  if perm is not None:
    idx = jnp.take(jnp.concatenate([perm.astype(jnp.int32), jnp.full((1,), n_in, jnp.int32)]), idx)
  return jnp.take(x, idx, axis=1, mode="fill", fill_value=0)


def _scale_parts(dtype) -> int:
  """bfloat16 parts (8 significant bits each) that hold a ``dtype`` scale exactly: bf16 1, f16 2, f32 3."""
  return -(-(jnp.finfo(dtype).nmant + 1) // 8)


def _check(x: jax.Array, w: QArray):
  if not 1 <= w.bits <= 8:
    raise NotImplementedError(f"pallas_tpu qmatmul: {w.bits}-bit codes")
  if w.word_bits != 32 or w.codes.dtype != jnp.uint32:
    raise NotImplementedError("pallas_tpu qmatmul: codes must be packed in uint32 words")
  if w.group_size != -1 and w.group_size % _PACK:
    raise NotImplementedError(f"pallas_tpu qmatmul: group size {w.group_size} is not a multiple of {_PACK}")
  if x.dtype not in _DTYPES:
    raise NotImplementedError(f"pallas_tpu qmatmul: activations of dtype {x.dtype}")
  if x.shape[-1] != w.shape[1]:
    raise ValueError(f"qmatmul: x has {x.shape[-1]} input features, the weight {w.shape[1]}")


def _matmul_2d(xs: jax.Array, w: QArray, t: Tiling, out_dtype, interpret) -> jax.Array:
  """``x' [Mp, nk * S * stride] @ W^T -> [Mp, Np]`` in ``out_dtype``: one ``pallas_call``."""
  n_out, n_in = w.shape
  st = _Static(tiling=t, group_size=w.group_size, n_groups=w.scale.shape[1], asym=w.zero is not None,
               scale_parts=_scale_parts(w.scale.dtype), compute=jnp.dtype(xs.dtype),
               interpret=interpret is not None and interpret is not False)
  nn = -(-n_out // t.tn)
  n_slots = len(slot_table(t.bits)[0])
  g = w.group_size
  group_block = (lambda k: jax.lax.div(k * t.tk, t.gb * g)) if t.tiled else (lambda k: 0)
  weights = [w.codes, w.scale] + ([w.zero] if st.asym else [])
  in_specs = [pl.BlockSpec((2, t.tkw), lambda i, j, k: (0, 0)),
              pl.BlockSpec((t.tm, n_slots * t.stride), lambda i, j, k: (i, k)),
              pl.BlockSpec((t.tn, t.tkw), lambda i, j, k: (j, k))]
  in_specs += [pl.BlockSpec((t.tn, t.gb), lambda i, j, k: (j, group_block(k)))] * (len(weights) - 1)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=0, grid=(xs.shape[0] // t.tm, nn, t.nk), in_specs=in_specs,
      out_specs=pl.BlockSpec((t.tm, t.tn), lambda i, j, k: (i, j)),
      scratch_shapes=[pltpu.VMEM((t.tm, t.tn), jnp.float32), pltpu.VMEM((t.tn, n_slots * t.stride), xs.dtype)])
  m_pad = xs.shape[0]
  cost = pl.CostEstimate(flops=2 * m_pad * nn * t.tn * xs.shape[1], transcendentals=0,
                         bytes_accessed=int(xs.size * xs.dtype.itemsize * nn + w.codes.size * 4 * (m_pad // t.tm)
                                            + m_pad * nn * t.tn * jnp.dtype(out_dtype).itemsize))
  return pl.pallas_call(
      functools.partial(_kernel, st=st),
      out_shape=jax.ShapeDtypeStruct((m_pad, n_out if nn * t.tn == n_out else nn * t.tn), out_dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                           vmem_limit_bytes=_VMEM_LIMIT),
      interpret=interpret,
      cost_estimate=cost,
      name=f"qmatmul_w{t.bits}",
  )(jnp.asarray(_lanes(t)), xs, *weights)


def qmatmul_pallas(x: jax.Array, w: QArray, *, tiling: Tiling | None = None, interpret=None) -> jax.Array:
  """``x [..., in] @ W^T -> [..., out]`` in ``x.dtype`` with the Mosaic TPU kernel.

  ``tiling``: block sizes (default :func:`choose_tiling`); ``interpret``: passed to ``pallas_call`` (``True``, or a
  :class:`~jax.experimental.pallas.tpu.InterpretParams` for TPU interpret mode; default: ``True`` off TPU). Raises
  ``NotImplementedError`` for unsupported weights (module docstring).
  """
  _check(x, w)
  lead, (n_out, n_in) = x.shape[:-1], w.shape
  x = x.reshape(-1, n_in)
  if x.shape[0] == 0:
    return jnp.zeros((*lead, n_out), x.dtype)
  compute = jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32
  t = tiling or choose_tiling(x.shape[0], n_out, n_in, w.bits, w.group_size, compute)
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  out_dtype = x.dtype if x.dtype != jnp.float16 else jnp.float32
  out = _matmul_2d(_arrange(x, w.perm, n_in, t, compute), w, t, out_dtype, interpret)
  return out[:x.shape[0], :n_out].astype(x.dtype).reshape(*lead, n_out)


@OP.implementation("pallas_tpu", QArray, platforms=("tpu",))
def pallas_tpu(x, w, act=None):
  """The registered ``qmatmul`` implementation: ``act`` (an activation fake-quantizer) is applied to ``x`` first."""
  if act is not None:
    x = act(x)
  return qmatmul_pallas(x, w)
