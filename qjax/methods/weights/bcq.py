"""Binary-coding quantization (BCQ), the weight format of LUT-GEMM (Park et al., 2024).

Per matrix, :func:`quantize_weight` writes each group of ``g`` input columns of a row as
``w ~= sum_{i < q} alpha_i b_i (+ z)`` with ``b_i in {-1, +1}^g`` (a :class:`~qjax.core.formats.bcq.BCQArray`):

* **greedy** (``rounds=0``; Guo et al. 2017): ``r = w - z``; for ``i = 0..q-1``: ``b_i = sign(r)``,
  ``alpha_i = mean |r|``, ``r -= alpha_i b_i``;
* **refined greedy** (``search="refined"``, as the paper means it): greedy, then ``alpha`` (and ``z``) refit by
  least squares with the binaries fixed;
* **alternating** (``search="alternating"``, ``rounds >= 1``; Xu et al. 2018): ``rounds`` times: the
  least-squares refit, ``alpha <- sort(|alpha|, descending)``, then every weight re-assigned to the nearest of the
  ``2^q`` levels ``z + sum_i +-alpha_i`` (ties to the larger level). This is what the reference's
  ``quantize_bcq.quantize`` runs for any ``round >= 1`` (its quirk Q3: its docs call round 1 "refined greedy").

The least-squares refit is the reference's: ``k`` conjugate-gradient iterations on the normal equations
``(B^T B) alpha = B^T w`` from the current ``alpha`` (``k`` = number of unknowns, exact in exact arithmetic), with
``1e-6`` added to both CG denominators (which keeps it finite when two binaries coincide). With ``offset=True``
the unknowns are ``(alpha, z)``, the design ``[B, 1]``, and greedy starts from ``z = mean(w)`` (LUT-GEMM's
uniform-compatible form; the reference has no offset).

Differences from the reference (``lib/lutgemm/quantize_bcq.py``), both fixes:
  * greedy runs in float32 whatever the weight dtype (the reference updates the residual in the model dtype,
    bf16 for LLaMA-3.1: its quirk Q4);
  * ``sign(0)`` is taken as ``+1``, so no binary is 0 (the reference's ``torch.sign`` gives 0 "binaries" where a
    residual is exactly 0).
Groups are contiguous input columns (``group_size=-1``: the whole row); the last group may be partial (its
means and fits count only its real columns).

:func:`from_qarray` is the exact conversion of a uniform :class:`~qjax.core.formats.qarray.QArray` (RTN, GPTQ,
AWQ) to BCQ (``convert_bcq_format`` of the reference): with ``q = sum_i 2^i bit_i``,
``scale (q - zero) = sum_i (scale 2^i / 2) (2 bit_i - 1) + (sum_i scale 2^i / 2 - scale zero)``. The model-level
handler (``--method bcq``) searches (``source="search"``) or converts RTN codes (``source="uniform"``, the
reference's ``--lutgemm --rtn``, which forces asymmetric RTN; here ``sym`` chooses).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import tree, uniform
from qjax.core.errors import InputError
from qjax.core.formats.bcq import BCQArray
from qjax.core.formats.qarray import QArray
from qjax.core.options import Flag, option
from qjax.methods.registry import as_assignment, quantize_each, register_method
from qjax.methods.weights import flags, rtn
from qjax.models.families import DECODER_LINEARS

SEARCHES = ("alternating", "refined")
SOURCES = ("search", "uniform")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BCQResult:
  """What :func:`search` returns: ``binaries [out, in, q]`` (+-1 float32), ``alpha [out, G, q]``, ``offset
  [out, G]`` or None (float32), and ``mse [rounds + 1]``: the reconstruction MSE after greedy and after each
  refinement round."""
  binaries: jax.Array
  alpha: jax.Array
  offset: jax.Array | None
  mse: jax.Array


def _patterns(q: int) -> np.ndarray:
  """All ``2^q`` sign patterns ``[2^q, q]`` (+-1), pattern ``p``'s sign ``i`` is ``+1`` where bit ``i`` of ``p``
  is set."""
  return (((np.arange(2**q)[:, None] >> np.arange(q)) & 1) * 2 - 1).astype(np.float32)


def _cg(a, b, x, iters: int):
  """``iters`` conjugate-gradient steps on ``a x = b`` (batched: ``a [..., p, p]``, ``b, x [..., p]``), ``1e-6``
  added to both denominators (the reference's ``batch_cg_torch``)."""
  mv = lambda m, v: jnp.einsum("...ij,...j->...i", m, v)
  r = b - mv(a, x)
  p, rs = r, jnp.sum(r * r, -1, keepdims=True)
  for _ in range(iters):
    ap = mv(a, p)
    step = rs / (jnp.sum(p * ap, -1, keepdims=True) + 1e-6)
    x, r = x + step * p, r - step * ap
    rs_new = jnp.sum(r * r, -1, keepdims=True)
    p, rs = r + rs_new / (rs + 1e-6) * p, rs_new
  return x


def _refit(wg, mask, b, alpha, z):
  """Least-squares ``alpha`` (and ``z`` unless None) for fixed binaries ``b [o, G, g, q]`` over the real columns
  (``mask [G, g]``), from the current values, by :func:`_cg`."""
  design = b if z is None else jnp.concatenate([b, jnp.ones_like(b[..., :1])], -1)
  design = design * mask[..., None]
  gram = jnp.einsum("ogkp,ogkr->ogpr", design, design)
  rhs = jnp.einsum("ogkp,ogk->ogp", design, wg * mask)
  x0 = alpha if z is None else jnp.concatenate([alpha, z[..., None]], -1)
  x = _cg(gram, rhs, x0, x0.shape[-1])
  return (x, None) if z is None else (x[..., :-1], x[..., -1])


def _assign(wg, alpha, z):
  """Binaries ``[o, G, g, q]`` of the nearest of the ``2^q`` levels ``z + P alpha`` (ties: the larger level)."""
  pats = jnp.asarray(_patterns(alpha.shape[-1]))
  levels = jnp.einsum("lq,ogq->ogl", pats, alpha) + (0 if z is None else z[..., None])
  order = jnp.argsort(levels, axis=-1)
  srt = jnp.take_along_axis(levels, order, -1)
  mids = (srt[..., 1:] + srt[..., :-1]) / 2
  flat = lambda a: a.reshape(-1, a.shape[-1])
  idx = jax.vmap(lambda m, w: jnp.searchsorted(m, w, side="right"))(flat(mids), flat(wg)).reshape(wg.shape)
  return jnp.take(pats, jnp.take_along_axis(order, idx, -1), axis=0)


def _mse(wg, mask, b, alpha, z):
  w_hat = jnp.einsum("ogkq,ogq->ogk", b, alpha) + (0 if z is None else z[..., None])
  return jnp.sum(((w_hat - wg) * mask) ** 2) / jnp.sum(mask) / wg.shape[0]


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "rounds", "search", "offset"))
def search(w: jax.Array, *, bits: int, group_size: int = -1, rounds: int = 1, search: str = "alternating",
           offset: bool = False) -> BCQResult:
  """The BCQ search of the module docstring on ``w [out, in]`` (any float dtype; computed in float32)."""
  n = w.shape[1]
  wg = uniform.to_groups(w.astype(jnp.float32), group_size)                      # [o, G, g]
  mask = uniform.to_groups(jnp.ones((n,), jnp.float32), group_size)            # [G, g]
  count = jnp.sum(mask, -1, keepdims=True)
  z = jnp.sum(wg * mask, -1) / count[..., 0] if offset else None
  r = wg - (0 if z is None else z[..., None])
  bs, alphas = [], []
  for _ in range(bits):
    b = jnp.where(r >= 0, 1.0, -1.0)                                             # sign(0) = +1
    a = jnp.sum(jnp.abs(r) * mask, -1, keepdims=True) / count
    r = r - b * a
    bs.append(b)
    alphas.append(a[..., 0])
  b, alpha = jnp.stack(bs, -1), jnp.stack(alphas, -1)                           # [o, G, g, q], [o, G, q]
  history = [_mse(wg, mask, b, alpha, z)]
  if rounds > 0 and (bits > 1 or offset):
    if search == "refined":
      alpha, z = _refit(wg, mask, b, alpha, z)
      history.append(_mse(wg, mask, b, alpha, z))
    else:
      def one_round(carry, _):
        b, alpha, z = carry
        alpha, z = _refit(wg, mask, b, alpha, z)
        alpha = -jnp.sort(-jnp.abs(alpha), axis=-1)
        b = _assign(wg, alpha, z)
        return (b, alpha, z), _mse(wg, mask, b, alpha, z)

      (b, alpha, z), mses = jax.lax.scan(one_round, (b, alpha, z), None, length=rounds)
      history.extend(list(mses))
  binaries = uniform.from_groups(jnp.moveaxis(b, -1, 0), n)                    # [q, o, in]
  return BCQResult(jnp.moveaxis(binaries, 0, -1), alpha, z, jnp.stack(history))


def quantize_weight(w: jax.Array, *, bits: int, group_size: int = -1, rounds: int = 1,
                    search_mode: str = "alternating", offset: bool = False,
                    alpha_dtype: str = "float16") -> BCQArray:
  """BCQ-quantizes ``w [out, in]`` (:func:`search`) into a :class:`BCQArray` whose ``dequantize()`` has
  ``w.dtype``; alphas and offsets are stored in ``alpha_dtype``."""
  r = search(w, bits=bits, group_size=group_size, rounds=rounds, search=search_mode, offset=offset)
  return BCQArray.from_binaries(r.binaries, r.alpha, r.offset, group_size=group_size, dtype=w.dtype,
                                alpha_dtype=alpha_dtype)


@functools.partial(jax.jit, static_argnames=("alpha_dtype",))
def from_qarray(q: QArray, alpha_dtype: str | None = None) -> BCQArray:
  """The exact BCQ form of a uniform QArray (module docstring): ``alpha_i = scale 2^i / 2``, ``b_i = 2 bit_i(code)
  - 1``, ``offset = sum_i alpha_i - scale zero``; the column order (``perm``) is kept. ``alpha_dtype`` (default:
  the QArray's scale dtype) stores alphas and offsets: alphas are exact in it (power-of-two multiples of the
  stored scale), the offset is rounded once to it."""
  codes = q.unpacked_codes().astype(jnp.uint32)                                  # [out, in]
  bits01 = (codes[..., None] >> jnp.arange(q.bits, dtype=jnp.uint32)) & 1       # [out, in, q]
  scale = q.scale.astype(jnp.float32)                                           # [out, G]
  alpha = scale[..., None] * (2.0 ** jnp.arange(q.bits, dtype=jnp.float32) / 2)  # [out, G, q]
  offset = jnp.sum(alpha, -1) - scale * q.zero_point()
  return BCQArray.from_binaries(bits01.astype(jnp.float32) * 2 - 1, alpha, offset, group_size=q.group_size,
                                perm=q.perm, dtype=q.dtype, alpha_dtype=alpha_dtype or q.scale.dtype.name)


def convert(params):
  """A new tree with every :class:`QArray` replaced by :func:`from_qarray` (the same function, now in the
  LUT-GEMM format)."""
  flat = tree.flatten(params)
  return tree.replace(params, [p for p, v in flat.items() if isinstance(v, QArray)], lambda _, v: from_qarray(v))


@dataclasses.dataclass(frozen=True)
class BCQConfig:
  """``--method bcq`` (LUT-GEMM's binary-coding quantization; module docstring). ``rounds=0`` is greedy;
  ``sym`` applies to ``source="uniform"`` only."""
  bits: int = option(3, flags.BITS)
  group_size: int = option(-1, flags.GROUP_SIZE)
  rounds: int = option(1, Flag("--bcq-rounds", "BCQ refinement rounds: 0 greedy; >= 1 alternating rounds "
                                               "(the reference's --round, default 1)"))
  search: str = option("alternating", Flag("--bcq-search", "BCQ refinement: alternating (alpha refit + binary "
                                                           "re-assignment) or refined (one alpha refit)"))
  offset: bool = option(False, Flag("--bcq-offset", "fit a per-group offset z as well (LUT-GEMM's "
                                                    "uniform-compatible form)"))
  source: str = option("search", Flag("--bcq-from", "search (BCQ from the weights) or uniform (RTN codes "
                                                    "converted exactly, --sym / --no-sym)"))
  sym: bool = option(False, flags.SYM)
  alpha_dtype: str = "float16"
  targets: tuple[str, ...] = DECODER_LINEARS

  def __post_init__(self):
    if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
      raise InputError(f"BCQ bits must be between 1 and 8, got {self.bits}")
    if self.source == "uniform":
      uniform.check_grid(self.bits, self.group_size, "BCQ from uniform")
    elif not isinstance(self.group_size, int) or self.group_size == 0 or self.group_size < -1:
      raise InputError(f"BCQ group size must be -1 (per channel) or positive, got {self.group_size}")
    if self.search not in SEARCHES:
      raise InputError(f"--bcq-search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
    if self.source not in SOURCES:
      raise InputError(f"--bcq-from must be one of {', '.join(SOURCES)}, got {self.source!r}")
    if not isinstance(self.rounds, int) or self.rounds < 0:
      raise InputError(f"--bcq-rounds must be >= 0, got {self.rounds}")
    if self.search == "refined" and self.rounds != 1:
      raise InputError(f"refined greedy refits alpha once: --bcq-rounds {self.rounds} applies to alternating "
                       f"only (use --bcq-rounds 1, or 0 for greedy)")

  def describe(self) -> str:
    if self.source == "uniform":
      return f"RTN {'sym' if self.sym else 'asym'} -> BCQ"
    return "greedy" if self.rounds == 0 else "refined greedy" if self.search == "refined" else \
        f"alternating, {self.rounds} round{'s' if self.rounds > 1 else ''}"


def _quantize_one(w, c: BCQConfig) -> BCQArray:
  if c.source == "uniform":
    return from_qarray(rtn.quantize_weight(w, bits=c.bits, group_size=c.group_size, sym=c.sym,
                                           scale_dtype=c.alpha_dtype))
  return quantize_weight(w, bits=c.bits, group_size=c.group_size, rounds=c.rounds, search_mode=c.search,
                         offset=c.offset, alpha_dtype=c.alpha_dtype)


@register_method(BCQConfig, name="bcq", decoder_only=False)
def quantize(params, rules=BCQConfig(), *, model=None, calibration=None, progress: bool = True):
  """``(params, None)``: every weight of ``rules`` replaced by its :class:`BCQArray` (the registered handler)."""
  assignment = as_assignment(params, rules)
  desc = "BCQ " + "/".join(sorted({f"W{c.bits}" for c in assignment.values()}))
  return quantize_each(params, assignment, _quantize_one, desc=desc, progress=progress), None
