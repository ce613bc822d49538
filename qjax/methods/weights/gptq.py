"""GPTQ (Frantar et al., 2023): second-order, column-by-column weight quantization with error feedback.

Per matrix, :func:`quantize_weight` follows the reference implementation (qllm-infer ``lib/gptq/gptq.py``, notes
section 2.7): columns of ``H = (2/N) sum_i x_i x_i^T`` with zero diagonal are dead (``H_jj = 1``, ``W_:j = 0``);
damping ``percdamp * mean(diag H)``; ``U`` = upper Cholesky factor of ``H^{-1}``; columns are quantized in order
(``act_order``: by descending ``diag H``) and each column's error ``e = (w - q) / U_jj`` is fed back into the
remaining columns, lazily per block of ``block_size`` columns (Eq. 4 of the paper, in Cholesky form):
``W_:,k -= e * U_j,k``. The per-column loss is ``sum_rows (w - q)^2 / U_jj^2 / 2``.

Groups (``group_size = g > 0``): with ``static_groups`` every group's range is fitted up front on the original
weights in natural column order, so a stored checkpoint keeps contiguous groups even with act-order (no runtime
gather). Otherwise a group's range is fitted when its first column is reached, exactly as the reference does: on
the weights as they stood at the start of the current block (reference quirk Q2: a group starting inside a block
does not see that block's pending error updates). Fitting on the up-to-date weights instead was measured to give
no systematic gain (output error ratio 1.004 on average over 16 synthetic g32 cases built like the problems of
``tests/synthetic.py``, a one-off measurement), so the
reference semantics are kept. With act-order and non-static groups the groups are contiguous in act-order and the
QArray stores that column permutation.

Layout and cost (:mod:`qjax.methods.weights.error_feedback`): the sweep runs on ``W^T`` (a column of ``W`` is a
contiguous row), column by column inside sub-blocks of 16 columns, a matmul per sub-block for the rest of its block
and a matmul per block for the later columns; a group's range is fitted at a sub-block start (16 divides the group
size; otherwise the sub-block shrinks to a divisor). Compilation does not grow with the number of columns:
``lax.fori_loop`` s run over the columns, the sub-blocks and the blocks, the lazy trailing update touching a static
column range per segment (at most 4 segments), relying on ``U`` being upper triangular so finished columns
receive zero updates.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import linalg, uniform
from qjax.core.errors import InputError
from qjax.core.formats.qarray import QArray
from qjax.core.options import Flag, option
from qjax.methods.registry import as_assignment, exact_paths, register_method, shared
from qjax.methods.weights import error_feedback, flags
from qjax.models.families import DECODER_LINEARS

ROW_BUCKET = 64   # output rows are padded to a multiple of this, so small linears share one compiled sweep


@dataclasses.dataclass(frozen=True)
class HessianFactor:
  """The half of GPTQ that depends on the Hessian only (:func:`factorize`), shared by every linear reading the same
  input (q/k/v, gate/up): the column order, the dead columns and ``U``."""
  perm: jax.Array       # [in] int32: columns in quantization order (act-order: by descending diag H)
  dead: jax.Array       # [in] bool: H_jj == 0 (the weight column is zeroed)
  u: jax.Array          # [ncols, ncols] float32: upper Cholesky factor of the damped, permuted, padded H^{-1}
  percdamp: float       # damping actually used (grown if the Cholesky factorization failed)
  act_order: bool
  block_size: int


@functools.partial(jax.jit, static_argnames=("act_order", "block_size"))
def _factorize(h, percdamp, *, act_order, block_size):
  cols = h.shape[0]
  h = h.astype(jnp.float32)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(h.dtype))
  perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(cols)
  h = h[perm][:, perm]
  h = h + percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(cols, dtype=h.dtype)
  u, ok = error_feedback.factor(h, block_size)
  return (perm, dead, u), ok


def factorize(hessian: jax.Array, *, act_order: bool = False, percdamp: float = 0.01,
              block_size: int = 128) -> HessianFactor:
  """Dead columns, column order and ``U`` of ``hessian [in, in]`` (damping ``percdamp * mean(diag H)``; if the
  Cholesky factorization fails the damping is multiplied by 10, up to 5 times, with a warning)."""
  (perm, dead, u), damp = linalg.with_damping_retry(
      lambda d: _factorize(hessian, d, act_order=act_order, block_size=block_size), percdamp, "GPTQ")
  return HessianFactor(perm, dead, u, damp, act_order, block_size)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "act_order", "static_groups",
                                             "block_size"))
def _gptq(w, perm, dead, u, *, bits, group_size, sym, act_order, static_groups, block_size):
  out, cols = w.shape
  g = group_size
  w = w.astype(jnp.float32)
  chan_scale, chan_zero = uniform.fit(w, bits, sym)                      # [out, 1], before dead columns
  w = jnp.where(dead[None, :], 0.0, w)
  if g > 0 and static_groups:
    stat_scale, stat_zero = (a[..., 0] for a in uniform.fit(uniform.to_groups(w, g), bits, sym))  # [out, G]

  bs = block_size
  ncols = u.shape[0]
  wt = error_feedback.transpose_padded(w[:, perm], ncols)               # [ncols, out], quantization order
  ng = uniform.num_groups(ncols, g) if g > 0 else 1
  sub = error_feedback.sub_block_size(bs, g)
  if g > 0 and static_groups:
    stat_scale, stat_zero = stat_scale.T, stat_zero.T                   # [G, out]

  def quant_block(i1, w1, u1, state, acc):
    codes, losses, scales, zeros = state
    stale = jnp.pad(acc, ((0, max(g, 0)), (0, 0)))  # block-start weights, for the reference's group fits

    def refit_at_group_start(i0, w1, st):          # non-static groups: fitted on the block-start weights
      j = i1 + i0

      def refit(st):
        q1, loss1, _, _, scales, zeros = st
        s, z = (a[0] for a in uniform.fit(jax.lax.dynamic_slice_in_dim(stale, j, g), bits, sym, axis=0))
        scales = jax.lax.dynamic_update_slice_in_dim(scales, s[None], j // g, axis=0)
        zeros = jax.lax.dynamic_update_slice_in_dim(zeros, z[None], j // g, axis=0)
        return q1, loss1, s, z, scales, zeros
      return jax.lax.cond(j % g == 0, refit, lambda st: st, st)

    def col(i, wc, st):
      q1, loss1, scale, zero, scales, zeros = st
      j = i1 + i
      if g > 0 and static_groups:
        grp = jnp.minimum(perm[jnp.minimum(j, cols - 1)] // g, stat_scale.shape[0] - 1)
        scale, zero = stat_scale[grp], stat_zero[grp]
      q = uniform.quantize(wc, scale, zero, bits)
      deq = uniform.dequantize(q, scale, zero)
      d = u1[i, i]
      loss = jnp.sum((wc - deq) ** 2) / d**2 / 2
      return (wc - deq) / d, (q1.at[i].set(q.astype(jnp.uint8)), loss1.at[i].set(loss), scale, zero, scales, zeros)

    init = (jnp.zeros((bs, out), jnp.uint8), jnp.zeros((bs,), jnp.float32),
            *_block_params(scales, zeros, chan_scale, chan_zero, g, static_groups, i1), scales, zeros)
    start = refit_at_group_start if g > 0 and not static_groups else None
    err, (q1, loss1, _, _, scales, zeros) = error_feedback.block_sweep(w1, u1, col, init, sub=sub, start=start)
    codes = jax.lax.dynamic_update_slice_in_dim(codes, q1, i1, axis=0)
    losses = jax.lax.dynamic_update_slice_in_dim(losses, loss1, i1, axis=0)
    return err, (codes, losses, scales, zeros)

  state = (jnp.zeros((ncols, out), jnp.uint8), jnp.zeros((ncols,), jnp.float32), jnp.zeros((ng, out), jnp.float32),
           jnp.zeros((ng, out), jnp.float32))
  codes, losses, scales, zeros = error_feedback.sweep(wt, u, quant_block, state, block_size=bs)

  codes, losses = codes[:cols].T, losses[:cols]
  inv = jnp.argsort(perm)
  losses = losses[inv]
  if g <= 0:
    scales, zeros = chan_scale, chan_zero
  elif static_groups:
    scales, zeros = stat_scale.T, stat_zero.T
  else:
    scales, zeros = scales[:uniform.num_groups(cols, g)].T, zeros[:uniform.num_groups(cols, g)].T
  keep_perm = act_order and g > 0 and not static_groups
  if act_order and not keep_perm:
    codes = codes[:, inv]
  return codes, scales, zeros, losses, (perm if keep_perm else None)


def _block_params(scales, zeros, chan_scale, chan_zero, g, static_groups, i1):
  """Initial ``(scale [out], zero [out])`` carried through a block's columns: the running group's (it may have
  started in an earlier block when ``g`` does not divide the block size; ``scales [G, out]``)."""
  if g > 0 and not static_groups:
    return scales[i1 // g], zeros[i1 // g]
  return chan_scale[:, 0], chan_zero[:, 0]


@dataclasses.dataclass(frozen=True)
class GPTQResult:
  qarray: QArray
  losses: np.ndarray      # [in] per-column loss, original column order
  percdamp: float         # damping actually used (grown if the Cholesky factorization failed)


def quantize_weight(w: jax.Array, hessian: jax.Array | None = None, *, bits: int, group_size: int = -1,
                    sym: bool = False, act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01,
                    block_size: int = 128, scale_dtype: str | None = None,
                    factor: HessianFactor | None = None) -> GPTQResult:
  """GPTQ-quantizes ``w [out_features, in_features]`` given ``hessian [in, in]`` (float32), or its
  :func:`factorize` result ``factor`` (which then fixes ``act_order``, ``percdamp`` and ``block_size``).

  Returns the QArray (dequantizes to ``[out, in]`` in ``w.dtype``; scales in ``scale_dtype``, default
  ``w.dtype``), the per-column losses and the damping used. If the Cholesky factorization fails the damping is
  multiplied by 10 (up to 5 times) with a warning.
  """
  if static_groups and group_size <= 0:
    raise ValueError("static_groups needs group_size > 0")
  if factor is None:
    factor = factorize(hessian, act_order=act_order, percdamp=percdamp, block_size=block_size)
  out = w.shape[0]
  padded = jnp.pad(w, ((0, -out % ROW_BUCKET), (0, 0)))   # rows are independent: zero rows change nothing
  codes, scale, zero, losses, perm = _gptq(padded, factor.perm, factor.dead, factor.u, bits=bits,
                                           group_size=group_size, sym=sym, act_order=factor.act_order,
                                           static_groups=static_groups, block_size=factor.block_size)
  codes, scale, zero = codes[:out], scale[:out], zero[:out]
  q = QArray.from_codes(codes, scale, zero, bits=bits, group_size=group_size, sym=sym, perm=perm, dtype=w.dtype,
                        scale_dtype=scale_dtype or w.dtype)
  return GPTQResult(q, np.asarray(losses), factor.percdamp)


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
  """Model-level GPTQ settings (see :func:`quantize_weight`). Act-order is on by default and ``static_groups=None``
  means "with act-order and groups": the combination that keeps a checkpoint's groups contiguous (README, GPTQ
  defaults); ``targets`` are regexes over weight paths."""
  bits: int = option(4, flags.BITS)
  group_size: int = option(-1, flags.GROUP_SIZE)
  sym: bool = option(False, flags.SYM)
  act_order: bool = option(True, flags.ACT_ORDER)
  static_groups: bool | None = option(None, Flag("--static-groups", "fit all groups up front, contiguous with "
                                                                     "act-order (default: with act-order and groups)"))
  percdamp: float = option(0.01, flags.PERCDAMP)
  block_size: int = option(128, flags.BLOCK_SIZE)
  true_sequential: bool = option(False, flags.TRUE_SEQUENTIAL)
  scale_dtype: str = "float16"
  targets: tuple[str, ...] = DECODER_LINEARS

  def __post_init__(self):
    uniform.check_grid(self.bits, self.group_size, "GPTQ")
    if self.static_groups is None:
      object.__setattr__(self, "static_groups", self.act_order and self.group_size > 0)
    if self.static_groups and self.group_size <= 0:
      raise InputError("static groups need a group size (--groupsize > 0)")
    if not 0 < self.percdamp:
      raise InputError(f"percdamp must be positive, got {self.percdamp}")
    if self.block_size < 1:
      raise InputError(f"block size must be positive, got {self.block_size}")


@register_method(GPTQConfig, name="gptq", needs_calibration=True, streams=True)
def quantize(params, rules, *, model=None, calibration=None, progress: bool = True):
  """Model-level GPTQ, the registered handler: ``(params, CalibrationReport)`` with every decoder linear of
  ``rules`` (a config on its targets, or ``{path: config}``: per-linear bits, groups, ...) as a QArray, layer by
  layer on ``calibration`` (:func:`qjax.calibration.layerwise.quantize_layerwise`; ``true_sequential`` must agree)."""
  if calibration is None:
    raise InputError("GPTQ needs calibration data")
  assignment = as_assignment(params, rules)

  last = {}   # the latest (Hessian, settings) and its factorization: q/k/v and gate/up come in a row, one H each

  def one(path, w, h):
    c = assignment[path]
    settings = (c.act_order, c.percdamp, c.block_size)
    if last.get("h") is not h or last.get("settings") != settings:
      last.update(h=h, settings=settings,
                  factor=factorize(h, act_order=c.act_order, percdamp=c.percdamp, block_size=c.block_size))
    r = quantize_weight(w, bits=c.bits, group_size=c.group_size, sym=c.sym, static_groups=c.static_groups,
                        scale_dtype=c.scale_dtype, factor=last["factor"])
    return r.qarray, float(r.losses.sum())

  bits = "/".join(sorted({f"W{c.bits}" for c in assignment.values()}))
  return calibration.quantize_layerwise(params, one, targets=exact_paths(assignment),
                                            true_sequential=bool(shared(assignment, "true_sequential")),
                                            progress=progress, desc=f"GPTQ {bits}")
