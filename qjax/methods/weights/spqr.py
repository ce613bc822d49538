"""SpQR (Dettmers et al., 2023): Sparse-Quantized Representation for near-lossless LLM weight compression.

Idea (paper): GPTQ-style quantization with very small groups (``g = 16`` input columns) made affordable by
quantizing the groups' statistics again ("bilevel": the scales and zero points of ``beta2`` consecutive output rows
share a 3-bit quantizer), plus the few weights whose quantization error is disproportionately large (outliers)
kept exactly in a sparse side structure.

Per matrix, :func:`quantize_weight` follows the reference engine (qllm-infer ``lib/spqr/spqr_engine.py`` and
``quant_groups.py``; notes section 2.9). With ``maxq = 2**bits - 1``:

Level 1, per output row over a group of ``g`` columns (no zero forced into the range, zero point not rounded)::

    xmin, xmax = min_k w_k, max_k w_k         (sym: xmax = max(|xmin|, xmax), xmin = -xmax)
    xmin == xmax  ->  xmin, xmax = -1, +1
    s = (xmax - xmin) / maxq;   z = -xmin / s  (sym: (maxq + 1) / 2)

Level 2 (bilevel): the ``[out]`` vectors ``s`` and ``z`` of a group are cut into runs of ``beta2 = qq_groupsize``
consecutive output rows; each run is fitted by the level-1 rule (asymmetric) at ``qq_scale_bits`` resp.
``qq_zero_bits`` bits, giving ``(s2, z2)``, and replaced by its dequantization
``s_hat = s2 * (clip(round(s / s2 + z2), 0, 2**qq - 1) - z2)``. Weights:
``q = clip(round(w / max(s_hat, 1e-9) + z_hat), 0, maxq)``, ``w_hat = s_hat * (q - z_hat)``.

Engine: with ``act_order`` the columns are permuted by descending ``diag H``; damping ``percdamp * mean|diag H|``
is added BEFORE the dead-column fix (``H_jj = 1``, ``W_:j = 0`` where ``diag H`` was 0; GPTQ does it the other way
round); ``U`` = upper Cholesky factor of ``H^{-1}``, ``d_j = U_jj``; the outlier threshold is
``thr = tau * mean_j(var_o(W_oj) / d_j^2)`` (unbiased variance over output rows, fixed per matrix). Columns are
quantized in order. At a group start the group's quantizer is fitted on the current, error-updated weights; with a
finite ``tau`` and not ``simplified_outliers`` a leave-one-out pre-detection comes first: for each weight ``j`` of
a row, ``gain_j = err(all) - err(all but j)`` with ``err(S) = sum_{k in S} ((w_hat_k - w_k) / d_k)^2`` under a
level-1 fit on ``S`` only; weights with ``gain_j > thr`` are replaced by the mean of the row's other weights
before the (bilevel) fit. Each column: ``e = (w - w_hat) / d_j``; weights with ``e^2 > thr`` are outliers, kept
exactly (then ``e = 0`` there); the error is fed back into the later columns (GPTQ's Eq. 4 in Cholesky form)
``W_:k -= e * U_jk``, lazily per block of ``block_size`` columns as in :mod:`qjax.methods.weights.gptq`.

Deliberate differences from the reference (each equal to it where the reference is well defined):
  * the block size is rounded to a multiple of ``g`` (at least ``g``) so a group never straddles a block (the
    reference fits such a group partly on weights lacking the previous block's pending update); identical when
    ``g`` divides ``block_size`` (e.g. 16 and 128);
  * storage is real: the level-2 ``(s2, z2)`` and the outlier values are stored in ``stats_dtype`` (float16 by
    default; ``z2`` clipped to its finite range) and the algorithm uses the stored (rounded) values, so
    :meth:`SpQRArray.dequantize` is bit-identical to the reconstruction used for the error feedback. With
    ``stats_dtype="float32"`` the arithmetic is the reference's;
  * partial groups: the last group of columns may be partial (like the reference's truncated slice), and so may
    the last run of ``beta2`` output rows when ``qq_groupsize`` does not divide ``out`` (the reference requires
    divisibility); a partial run is fitted over its valid rows only;
  * a level-2 run whose values are all equal (e.g. a partial run of one row) is represented exactly (range
    ``[v, v + 1]``); the reference's flat range ``[-1, 1]`` would turn a scale of 0.01 into 0.14 at 3 bits;
  * ``sym``: ``xmin = -xmax`` on every row (quirk Q1 fixed, as in :mod:`qjax.core.uniform`) and the constant zero point
    is neither stored nor level-2 quantized (the reference pushes the constant ``(maxq + 1) / 2`` through a
    degenerate level-2 range, turning it into 1.0 at 3 bits); the reference's ``qq_zero_sym`` is not offered.

Compilation does not grow with the number of columns: nested ``lax.fori_loop`` over the blocks, the groups of a
block (the group fit, its leave-one-out fits vectorized over the ``g`` columns as one ``[out, g, g]`` array) and
the columns of a group; the lazy trailing update of a block touches static column ranges as in GPTQ.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import linalg, tree, uniform
from qjax.core.errors import InputError
from qjax.core.formats.spqr import SpQRArray
from qjax.core.options import Flag, option
from qjax.methods.registry import as_assignment, exact_paths, register_method, shared
from qjax.methods.weights import error_feedback, flags
from qjax.models.families import DECODER_LINEARS

_EPS = 1e-9          # scale floor of the reference's quantize()


def _fit(x, mask, bits, sym, exact_flat=False):
  """Range of each slice of ``x`` along the last axis, over the entries where ``mask`` (broadcast against ``x``)
  is True. Returns float32 ``(scale, zero)`` with a kept size-1 last axis.

  A flat slice (all valid entries equal, or none valid) gets the reference's range ``[-1, 1]``, or with
  ``exact_flat`` the range ``[v, v + 1]`` that represents its value ``v`` (level 2, see :func:`_quantize_stat`).
  """
  maxq = 2**bits - 1
  xmin = jnp.min(jnp.where(mask, x, jnp.inf), axis=-1, keepdims=True)
  xmax = jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1, keepdims=True)
  if sym:
    xmax = jnp.maximum(-xmin, xmax)
    xmin = -xmax
  flat = xmin >= xmax
  xmin = jnp.where(flat, xmin if exact_flat else -1.0, xmin)
  xmax = jnp.where(flat, xmin + 1.0 if exact_flat else 1.0, xmax)
  scale = uniform.true_divide(xmax - xmin, jnp.full_like(xmax, maxq))
  zero = jnp.full_like(scale, (maxq + 1) / 2) if sym else -xmin / scale
  return scale, zero


def _quantize(x, scale, zero, bits):
  """Float32 codes ``clip(round(x / max(scale, 1e-9) + zero), 0, maxq)`` (zero not necessarily an integer)."""
  return jnp.clip(jnp.round(uniform.true_divide(x, jnp.maximum(scale, _EPS)) + zero), 0, 2**bits - 1)


def _quantize_stat(v, bits, run, stats_dtype):
  """Level 2: ``v [out]`` -> ``(v_hat [out], codes [out] uint8, stats [R, 2])``, ``stats = (s2, z2)`` per run of
  ``run`` consecutive rows (the last run may be partial), rounded to ``stats_dtype`` before use.

  A run whose values are all equal (e.g. a partial run of one row) keeps its value: the reference's flat range
  ``[-1, 1]`` would turn a scale of 0.01 into 0.14 at 3 bits (``_fit(exact_flat=True)``).
  """
  out = v.shape[0]
  nr = -(-out // run)
  vr = jnp.pad(v, (0, nr * run - out)).reshape(nr, run)
  valid = (jnp.arange(nr * run) < out).reshape(nr, run)
  big = float(jnp.finfo(stats_dtype).max)
  s2, z2 = (jnp.clip(a, -big, big).astype(stats_dtype).astype(jnp.float32)
            for a in _fit(vr, valid, bits, False, exact_flat=True))
  q = _quantize(vr, s2, z2, bits)
  v_hat = uniform.dequantize(q, s2, z2)
  return v_hat.reshape(-1)[:out], q.reshape(-1)[:out].astype(jnp.uint8), jnp.concatenate([s2, z2], axis=-1)


def _loo_gain(x, valid, d, bits, sym):
  """Leave-one-out outlier scores of a group ``x [out, g]`` (``valid [g]`` real columns, ``d [g]`` = ``U_jj``):
  ``[out, g]`` reduction of the row's ``d``-weighted squared level-1 error when weight ``j`` is left out (not
  quantized, so no error) and the range fitted on the others."""
  def err(x, mask):
    scale, zero = _fit(x, mask, bits, sym)
    r = (uniform.dequantize(_quantize(x, scale, zero, bits), scale, zero) - x) / d
    return jnp.sum(jnp.where(mask, r**2, 0.0), axis=-1)

  loo = valid[None, :] & ~jnp.eye(x.shape[1], dtype=bool)          # [left out j, k]
  return err(x, valid)[:, None] - err(x[:, None, :], loo)


def _fit_group(x, valid, d, thr, *, bits, sym, loo, qq_scale_bits, qq_zero_bits, qq_groupsize, stats_dtype):
  """Bilevel quantizer of the group ``x [out, g]``: ``(s_hat [out], z_hat [out], stored)`` where ``stored`` is the
  level-2 ``(scale codes [out], scale stats [R, 2])`` followed, unless ``sym``, by the same for the zeros."""
  if loo:
    likely = (_loo_gain(x, valid, d, bits, sym) > thr) & valid
    keep = valid & ~likely
    mean = jnp.sum(jnp.where(keep, x, 0.0), axis=1, keepdims=True) / jnp.maximum(
        jnp.sum(keep, axis=1, keepdims=True), 1)
    x = jnp.where(likely, mean, x)
  scale, zero = (a[:, 0] for a in _fit(x, valid[None, :], bits, sym))
  scale, *stored = _quantize_stat(scale, qq_scale_bits, qq_groupsize, stats_dtype)
  if not sym:
    zero, *zstored = _quantize_stat(zero, qq_zero_bits, qq_groupsize, stats_dtype)
    stored += zstored
  return scale, zero, tuple(stored)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "qq_scale_bits", "qq_zero_bits",
                                             "qq_groupsize", "sym", "act_order", "outliers", "simplified",
                                             "block_size", "stats_dtype"))
def _spqr(w, h, percdamp, tau, *, bits, group_size, qq_scale_bits, qq_zero_bits, qq_groupsize, sym, act_order,
          outliers, simplified, block_size, stats_dtype):
  """The engine on ``w [out, cols]``, ``h [cols, cols]``. Returns, in stored column order, the codes (uint8),
  the reconstruction (float32) and the outlier mask ``[out, cols]``, the group storage (``[G, ...]`` arrays, see
  :func:`_fit_group`), then the per-column losses in original order, ``perm`` (or ``None``), whether the
  Cholesky factorization succeeded and the absolute outlier threshold."""
  out, cols = w.shape
  g, bs = group_size, block_size
  w = w.astype(jnp.float32)
  h = h.astype(jnp.float32)
  perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(cols)
  w = w[:, perm]
  h = h[perm][:, perm]
  dead = jnp.diag(h) == 0
  h = h + percdamp * jnp.mean(jnp.abs(jnp.diag(h))) * jnp.eye(cols, dtype=h.dtype)
  idx = jnp.arange(cols)
  h = h.at[idx, idx].set(jnp.where(dead, 1.0, jnp.diag(h)))       # damping before the dead fix (reference)
  w = jnp.where(dead[None, :], 0.0, w)

  u, ok = error_feedback.factor(h, bs)                   # padded columns: dead, never outliers
  ncols = u.shape[0]
  wt = error_feedback.transpose_padded(w, ncols)         # [ncols, out]
  d = jnp.diag(u)
  thr = tau * jnp.mean(jnp.var(w, axis=0, ddof=1) / d[:cols] ** 2) if outliers else jnp.float32(jnp.inf)
  fit_group = functools.partial(_fit_group, bits=bits, sym=sym, loo=outliers and not simplified,
                                qq_scale_bits=qq_scale_bits, qq_zero_bits=qq_zero_bits, qq_groupsize=qq_groupsize,
                                stats_dtype=stats_dtype)

  def quant_block(i1, w1, u1, state, w):
    codes, recon, mask, losses, stored = state

    def start(i, w1, st):
      def refit(st):
        *cols_state, _, _, stored = st
        j = i1 + i
        x = jax.lax.dynamic_slice_in_dim(w1, i, g).T                     # the group's current columns [out, g]
        scale, zero, new = fit_group(x, j + jnp.arange(g) < cols, jax.lax.dynamic_slice_in_dim(d, j, g), thr)
        return (*cols_state, scale, zero, jax.tree.map(lambda a, v: a.at[j // g].set(v), stored, new))
      return jax.lax.cond(i % g == 0, refit, lambda st: st, st)

    def col(i, wc, st):
      q1, r1, m1, loss1, scale, zero, stored = st
      j = i1 + i
      dj = u1[i, i]
      q = _quantize(wc, scale, zero, bits)
      wq = uniform.dequantize(q, scale, zero)
      if outliers:
        is_out = (((wc - wq) / dj) ** 2 > thr) & (j < cols)
        q = _quantize(jnp.where(is_out, 0.0, wc), scale, zero, bits)
        wq = jnp.where(is_out, wc.astype(stats_dtype).astype(jnp.float32), uniform.dequantize(q, scale, zero))
      else:
        is_out = jnp.zeros((out,), bool)
      return (wc - wq) / dj, (q1.at[i].set(q.astype(jnp.uint8)), r1.at[i].set(wq), m1.at[i].set(is_out),
                              loss1.at[i].set(jnp.sum((wc - wq) ** 2) / dj**2 / 2), scale, zero, stored)

    blank = jnp.zeros((bs, out), jnp.float32)
    init = (blank.astype(jnp.uint8), blank, blank.astype(bool), jnp.zeros((bs,), jnp.float32),
            jnp.zeros((out,), jnp.float32), jnp.zeros((out,), jnp.float32), stored)
    err, (q1, r1, m1, loss1, _, _, stored) = error_feedback.block_sweep(
        w1, u1, col, init, sub=error_feedback.sub_block_size(bs, g), start=start)
    put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v, i1, axis=0)
    return err, (put(codes, q1), put(recon, r1), put(mask, m1), put(losses, loss1), stored)

  ng = ncols // g
  nr = -(-out // qq_groupsize)
  stat = (jnp.zeros((ng, out), jnp.uint8), jnp.zeros((ng, nr, 2), jnp.float32))
  state = (jnp.zeros((ncols, out), jnp.uint8), jnp.zeros((ncols, out), jnp.float32),
           jnp.zeros((ncols, out), bool), jnp.zeros((ncols,), jnp.float32), stat if sym else stat + stat)
  codes, recon, mask, losses, stored = error_feedback.sweep(wt, u, quant_block, state, block_size=bs)
  stored = tuple(a[:uniform.num_groups(cols, g)] for a in stored)
  return (codes[:cols].T, recon[:cols].T, mask[:cols].T, stored, losses[:cols][jnp.argsort(perm)],
          perm if act_order else None, ok, thr)


def check_settings(*, bits: int, group_size: int, qq_scale_bits: int, qq_zero_bits: int, qq_groupsize: int,
                   outlier_threshold: float, percdamp: float, block_size: int):
  """Raises :class:`~qjax.core.errors.InputError` on settings the engine cannot use."""
  if not 2 <= bits <= 8:
    raise InputError(f"SpQR bits must be between 2 and 8, got {bits}")
  if group_size <= 0:
    raise InputError(f"SpQR needs groups: group size must be positive, got {group_size}")
  for name, b in (("qq_scale_bits", qq_scale_bits), ("qq_zero_bits", qq_zero_bits)):
    if not 1 <= b <= 8:
      raise InputError(f"{name} must be between 1 and 8, got {b}")
  if qq_groupsize < 1:
    raise InputError(f"qq_groupsize must be positive, got {qq_groupsize}")
  if not outlier_threshold > 0:
    raise InputError(f"outlier threshold must be positive (inf: no outliers), got {outlier_threshold}")
  if not percdamp > 0:
    raise InputError(f"percdamp must be positive, got {percdamp}")
  if block_size < 1:
    raise InputError(f"block size must be positive, got {block_size}")


@dataclasses.dataclass(frozen=True)
class SpQRResult:
  array: SpQRArray
  losses: np.ndarray          # [in] per-column loss sum_rows (w - w_hat)^2 / U_jj^2 / 2, original column order
  reconstruction: np.ndarray  # [out, in] float32, original column order: the weights the error feedback used
  threshold: float            # absolute outlier threshold thr = tau * mean_j var_o(W_oj) / U_jj^2 (inf: none)
  percdamp: float             # damping actually used (grown if the Cholesky factorization failed)

  @property
  def outliers(self) -> int:
    return self.array.num_outliers

  @property
  def average_bits(self) -> float:
    return self.array.average_bits

  @property
  def stored_bits(self) -> float:
    return self.array.stored_bits


def quantize_weight(w: jax.Array, hessian: jax.Array, *, bits: int, group_size: int, qq_scale_bits: int = 3,
                    qq_zero_bits: int = 3, qq_groupsize: int = 16, outlier_threshold: float = math.inf,
                    act_order: bool = False, percdamp: float = 0.01, simplified_outliers: bool = False,
                    sym: bool = False, block_size: int = 128, stats_dtype: str = "float16") -> SpQRResult:
  """SpQR-quantizes ``w [out_features, in_features]`` given ``hessian [in, in]`` (float32).

  ``outlier_threshold`` is the relative ``tau`` (``inf``: no outliers, no leave-one-out detection);
  ``stats_dtype`` stores the level-2 statistics and the outlier values. Returns the :class:`SpQRArray`
  (dequantizes to ``[out, in]`` in ``w.dtype``), the per-column losses, the reconstruction, the absolute
  threshold and the damping used. If the Cholesky factorization fails the damping is multiplied by 10 (up to 5
  times) with a warning.
  """
  check_settings(bits=bits, group_size=group_size, qq_scale_bits=qq_scale_bits, qq_zero_bits=qq_zero_bits,
                 qq_groupsize=qq_groupsize, outlier_threshold=outlier_threshold, percdamp=percdamp,
                 block_size=block_size)
  if w.ndim != 2 or hessian.shape != (w.shape[1],) * 2:
    raise InputError(f"SpQR needs w [out, in] and H [in, in], got {w.shape} and {hessian.shape}")
  kw = dict(bits=bits, group_size=group_size, qq_scale_bits=qq_scale_bits, qq_zero_bits=qq_zero_bits,
            qq_groupsize=qq_groupsize, sym=sym, act_order=act_order, outliers=math.isfinite(outlier_threshold),
            simplified=simplified_outliers, block_size=max(group_size, block_size // group_size * group_size),
            stats_dtype=jnp.dtype(stats_dtype).name)
  tau = jnp.float32(outlier_threshold if math.isfinite(outlier_threshold) else 0.0)
  def run(damp):
    codes, recon, mask, stored, losses, perm, ok, thr = _spqr(w, hessian, damp, tau, **kw)
    return (codes, recon, mask, stored, losses, perm, thr), ok

  (codes, recon, mask, stored, losses, perm, thr), damp = linalg.with_damping_retry(run, percdamp, "SpQR")
  to_rows = lambda a: jnp.moveaxis(a, 0, 1)                 # [G, out] -> [out, G]; [G, R, 2] -> [R, G, 2]
  zero_parts = (None, None) if sym else tuple(map(to_rows, stored[2:]))
  array = SpQRArray.from_codes(codes, to_rows(stored[0]), to_rows(stored[1]), *zero_parts, mask, recon,
                               perm=perm, bits=bits, group_size=group_size, qq_scale_bits=qq_scale_bits,
                               qq_zero_bits=qq_zero_bits, qq_groupsize=qq_groupsize, sym=sym, dtype=w.dtype,
                               stats_dtype=stats_dtype)
  recon = np.asarray(recon)
  if perm is not None:
    recon = recon[:, np.argsort(np.asarray(perm))]
  return SpQRResult(array, np.asarray(losses), recon, float(thr), damp)


@dataclasses.dataclass(frozen=True)
class SpQRConfig:
  """Model-level SpQR settings (see :func:`quantize_weight`); ``targets`` are regexes over weight paths."""
  bits: int = option(3, flags.BITS)
  group_size: int = option(16, flags.GROUP_SIZE)
  qq_scale_bits: int = option(3, Flag("--qq-scale-bits", "bits of the 2nd-level scale quantization"))
  qq_zero_bits: int = option(3, Flag("--qq-zero-bits", "bits of the 2nd-level zero quantization"))
  qq_groupsize: int = option(16, Flag("--qq-groupsize", "output rows sharing 2nd-level statistics"))
  outlier_threshold: float = option(math.inf, Flag("--outlier-threshold", "relative outlier threshold (inf: none)"))
  act_order: bool = option(False, flags.ACT_ORDER)
  percdamp: float = option(0.01, flags.PERCDAMP)
  simplified_outliers: bool = option(False, Flag("--simplified-outliers",
                                                 "skip the leave-one-out outlier pre-detection"))
  sym: bool = option(False, flags.SYM)
  true_sequential: bool = option(False, flags.TRUE_SEQUENTIAL)
  block_size: int = option(128, flags.BLOCK_SIZE)
  stats_dtype: str = "float16"
  targets: tuple[str, ...] = DECODER_LINEARS

  def __post_init__(self):
    check_settings(bits=self.bits, group_size=self.group_size, qq_scale_bits=self.qq_scale_bits,
                   qq_zero_bits=self.qq_zero_bits, qq_groupsize=self.qq_groupsize,
                   outlier_threshold=self.outlier_threshold, percdamp=self.percdamp, block_size=self.block_size)


@register_method(SpQRConfig, name="spqr", needs_calibration=True, streams=True)
def quantize(params, rules, *, model=None, calibration=None, progress: bool = True):
  """Model-level SpQR, the registered handler: ``(params, CalibrationReport)`` with every decoder linear of
  ``rules`` (a config on its targets, or ``{path: config}``) as an :class:`SpQRArray`; per-linear loss = the sum
  of the column losses.

  The outlier count, hence the shape of an :class:`SpQRArray`, is data dependent, so layers holding them would
  recompile the calibration's layer functions for every layer and sub-group. The calibration therefore runs on the
  dense reconstructions (bit-identical to the arrays' ``dequantize()``) and the SpQRArrays replace them as each
  layer is finished (the walk's ``finish``; so SpQR can stream, one layer at a time).
  """
  if calibration is None:
    raise InputError("SpQR needs calibration data")
  assignment = as_assignment(params, rules)
  arrays = {}

  def one(path, w, h):
    c = assignment[path]
    r = quantize_weight(w, h, bits=c.bits, group_size=c.group_size, qq_scale_bits=c.qq_scale_bits,
                        qq_zero_bits=c.qq_zero_bits, qq_groupsize=c.qq_groupsize,
                        outlier_threshold=c.outlier_threshold, act_order=c.act_order, percdamp=c.percdamp,
                        simplified_outliers=c.simplified_outliers, sym=c.sym, block_size=c.block_size,
                        stats_dtype=c.stats_dtype)
    arrays[path] = r.array
    return jnp.asarray(r.reconstruction, w.dtype), float(r.losses.sum())

  bits = "/".join(sorted({f"W{c.bits}" for c in assignment.values()}))
  def finish(prefix, layer):     # the layer's SpQRArrays replace the reconstructions the walk ran on
    mine = {p[len(prefix) + 1:]: a for p, a in arrays.items() if p.startswith(prefix + "/")}
    for p in mine:
      del arrays[f"{prefix}/{p}"]
    return tree.replace(layer, mine, lambda p, _: mine[p])

  return calibration.quantize_layerwise(params, one, targets=exact_paths(assignment),
                                        true_sequential=bool(shared(assignment, "true_sequential")),
                                        finish=finish, progress=progress, desc=f"SpQR {bits}")


@dataclasses.dataclass(frozen=True)
class BitsSummary:
  weights: int              # weights in SpQRArrays
  outliers: int
  average_bits: float       # the reference formula with the model-wide outlier share
  stored_bits: float        # 8 * stored bytes / weights


def bits_summary(params) -> BitsSummary:
  """Bits per weight over every :class:`SpQRArray` of a parameter tree (formula and actually stored)."""
  arrays = [v for v in tree.flatten(params).values() if isinstance(v, SpQRArray)]
  if not arrays:
    raise InputError("no SpQR-quantized weights in the parameter tree")
  n = sum(a.size for a in arrays)
  return BitsSummary(n, sum(a.num_outliers for a in arrays), sum(a.average_bits * a.size for a in arrays) / n,
                     sum(8 * a.nbytes for a in arrays) / n)
