"""AWQ (Lin et al., 2023): activation-aware weight quantization by per-input-channel scaling.

Weights that multiply large activations matter most. For a linear ``y = x W^T`` (``W [out, in]``) and a positive
``s [in]``, ``y = (x / s) (W diag(s))^T``: quantizing ``W diag(s)`` instead of ``W`` shrinks the relative rounding
error of the scaled-up (salient) input channels. ``1 / s`` is folded into the operation that produces ``x`` (a
norm, or the previous linear's output rows; :mod:`qjax.methods.scaling`), so the float model computes the same function
and only the quantized weights differ. Per decoder layer, on the layer's calibration inputs:

1. Scale search, per scaling group (linears sharing one input, and the operation ``1 / s`` folds into)::

       s(alpha) = t / sqrt(max(t) * min(t)),   t = max(m^alpha, 1e-4),   m = mean |x| per input channel [in]
       E(alpha) = sum_{l in group} tr(D_l H D_l^T),   D_l = Q(W_l diag(s)) diag(s)^-1 - W_l

   over ``alpha = i / n_grid, i = 0..n_grid-1``, keeping the first minimizer. ``Q`` is the group-wise RTN fake
   quantizer (:mod:`qjax.core.uniform`) and ``H = (2/N) sum x x^T [in, in]`` the input's Hessian statistic:
   ``||X D^T||_F^2 = (N/2) tr(D H D^T)`` over the ``N`` calibration tokens, so no activation is stored; the grid
   is one ``lax.map`` inside one ``jit`` (see :func:`search_scale` for why not ``vmap``). ``alpha = 0`` gives
   ``s = 1``, plain RTN, so the chosen scales never do worse than RTN on this objective. Deviation from the
   reference (llm-awq ``auto_scale``): it measures the error
   of the whole block's output (the self-attention output for q/k/v, the MLP output for gate/up); here it is each
   linear's own output, summed over the group (identical for the one-linear groups ``v -> o``, ``up -> down``).
   The clamp and the normalization are the reference's.

   Groups, in execution order (:func:`scale_groups`). LLaMA: ``input_layernorm -> q, k, v``; ``v -> o`` only when
   ``num_kv_heads == num_heads`` (with GQA one row of ``v`` feeds several query heads' columns of ``o``, so one
   scale per ``o`` column cannot be matched; skipped as in the reference); ``post_attention_layernorm -> gate,
   up``; ``up -> down`` (``silu(gate) * up`` is linear in ``up``). OPT: ``self_attn_layer_norm -> q, k, v``;
   ``v -> out_proj``; ``final_layer_norm -> fc1``; ``fc1 -> fc2`` only with ReLU, which is positively homogeneous
   (``relu(z / s) = relu(z) / s`` for ``s > 0``), as in the reference; other activations (GELU) skip it.

2. Clipping (``clip``), for every quantized linear except q and k (skipped as in the reference: their error passes
   through the ``q k^T`` product and softmax, which a per-linear objective does not see). Per output row and
   weight group ``w_g`` with quantizer range ``[lo, hi]`` (``lo = min(min w_g, 0)``, ``hi = max(max w_g, 0)``;
   symmetric: ``hi = max(-lo, hi), lo = -hi``), the weights are clamped to ``[r lo, r hi]`` for
   ``r = 1 - i / clip_grid, i = 0..int(max_shrink * clip_grid) - 1`` and the ``r`` minimizing
   ``d H_gg d^T``, ``d = Q(clamp(w_g)) - w_g``, is kept (``H_gg``: the Hessian block of the group's columns, i.e.
   the exact error of that group's partial dot product over all calibration tokens). ``r = 1`` is a candidate,
   so clipping never increases a group's error. Deviations: the reference samples 512 tokens and clamps to
   ``+-r max|w_g|`` (the same as here when symmetric; asymmetric, it only ever shrinks the larger side).

3. Group-wise RTN (:func:`qjax.methods.weights.rtn.quantize_weight`) of the scaled, clipped weights -> QArrays.

Order (as the reference ``run_awq``): scales and clipping are searched on the float layer, and the next layer's
inputs are the float layer's outputs (``walk_layers(propagate="fp")``; the scaled float layer computes the same
function up to rounding). The per-layer ``losses`` report, for each quantized linear, its relative output error
``tr(D H D^T) / tr(W H W^T)`` against the original float linear on the calibration inputs, and for each folded
group ``alpha/<prev>`` the chosen ``alpha``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qjax.core import tree, uniform
from qjax.core.errors import InputError
from qjax.core.options import Flag, option
from qjax.methods import scaling
from qjax.methods.registry import as_assignment, exact_paths, register_method
from qjax.methods.weights import flags, rtn
from qjax.models import CausalLM, capture
from qjax.models.families import DECODER_LINEARS, Family

_NO_CLIP = ("q", "k")


@dataclasses.dataclass(frozen=True)
class AWQConfig:
  bits: int = option(4, flags.BITS)
  group_size: int = option(128, flags.GROUP_SIZE)
  sym: bool = option(False, flags.SYM)
  n_grid: int = option(20, Flag("--awq-grid", "scale search grid: alpha = i / n, i < n"))
  clip: bool = option(True, Flag("--awq-clip", "search the clipping range (--no-awq-clip: skip it)"))
  clip_grid: int = 20                 # clipping ratios 1 - i / clip_grid ...
  max_shrink: float = 0.5             # ... for i < max_shrink * clip_grid
  scale_dtype: str = "float16"
  targets: tuple[str, ...] = DECODER_LINEARS

  def __post_init__(self):
    uniform.check_grid(self.bits, self.group_size, "AWQ")
    if self.n_grid < 1:
      raise InputError(f"AWQ grid size must be positive, got {self.n_grid}")
    if self.clip and not (0 < self.max_shrink < 1 and int(self.max_shrink * self.clip_grid) >= 1):
      raise InputError(f"AWQ clipping needs 0 < max_shrink < 1 and at least one ratio, got max_shrink "
                       f"{self.max_shrink}, clip_grid {self.clip_grid}")

  def quantizer(self) -> dict:
    return dict(bits=self.bits, group_size=self.group_size, sym=self.sym)


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
  """Linears ``paths`` (relative to the layer) sharing one input; their scales fold into ``prev``: a norm path
  (``into_norm``) or the path of the linear whose output rows feed them."""
  prev: str
  paths: tuple[str, ...]
  into_norm: bool


def scale_groups(model: CausalLM) -> tuple[ScaleGroup, ...]:
  """The model's AWQ scaling groups in execution order (see the module docstring for which are foldable)."""
  c, fam = model.config, model.family
  groups = [ScaleGroup(norm, tuple(fam.linear_path(r) for r in roles), True) for norm, roles in fam.norm_feeds]
  for first, second in fam.foldable_linear_pairs(c):
    groups.append(ScaleGroup(fam.linear_path(first), (fam.linear_path(second),), False))
  order = [p for _, p in fam.linears]
  return tuple(sorted(groups, key=lambda g: order.index(g.paths[0])))


def _input_owner(fam: Family) -> dict[str, str]:
  """Linear path -> path of the linear whose input statistics it shares (the first one its norm feeds)."""
  owner = {p: p for _, p in fam.linears}
  for _, roles in fam.norm_feeds:
    owner.update({fam.linear_path(r): fam.linear_path(roles[0]) for r in roles})
  return owner


@jax.jit
def output_error(d: jax.Array, hessian: jax.Array) -> jax.Array:
  """``tr(D H D^T)`` for ``D [out, in]``, ``H [in, in]``: ``(2/N) ||X D^T||_F^2`` when ``H = (2/N) X^T X``."""
  d = d.astype(jnp.float32)
  return jnp.sum((d @ hessian.astype(jnp.float32)) * d)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym"))
def fake_quantize(w: jax.Array, *, bits: int, group_size: int, sym: bool) -> jax.Array:
  """Group-wise RTN quantize-dequantize of ``w [out, in]`` in float32 (``rtn.quantize_weight`` with float32
  scales)."""
  wg = uniform.to_groups(w.astype(jnp.float32), group_size)
  return uniform.from_groups(uniform.fake_quantize(wg, bits, sym), w.shape[1])


def awq_scales(absmean: jax.Array, alpha: jax.Array) -> jax.Array:
  """``s = m^alpha / sqrt(max * min)`` with ``m^alpha`` clamped at 1e-4: ``[in]`` float32, positive."""
  s = jnp.maximum(jnp.power(absmean.astype(jnp.float32), alpha), 1e-4)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


class ScaleSearch(NamedTuple):
  alpha: jax.Array        # [] chosen alpha
  scales: jax.Array       # [in] s(alpha)
  errors: jax.Array       # [n_grid] E(alpha) for alpha = i / n_grid


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "n_grid"))
def search_scale(w: jax.Array, hessian: jax.Array, absmean: jax.Array, *, bits: int, group_size: int, sym: bool,
                 n_grid: int) -> ScaleSearch:
  """AWQ scale search for the linears stacked in ``w [out, in]`` (they share the input: rows of q, k, v
  concatenated) given their input's ``hessian [in, in]`` and ``absmean [in]``: minimizes ``E(alpha)`` (module
  docstring) over the grid.

  The grid is a ``lax.map``: one grid point's ``[out, in]`` intermediates are live at a time, and each point is
  quantized exactly as :func:`qjax.methods.weights.rtn.quantize_weight` does. Under ``vmap`` the constant divisor of
  ``uniform.fit``'s scale stays unbatched outside its optimization barrier, XLA turns the division into a
  reciprocal multiply, and the 1-ulp scale change flips round-half-even ties (every symmetric row's extreme
  weight is one), so ``E(0)`` would not be the RTN error.
  """
  w = w.astype(jnp.float32)
  alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

  def error(alpha):
    s = awq_scales(absmean, alpha)
    return output_error(fake_quantize(w * s, bits=bits, group_size=group_size, sym=sym) / s - w, hessian)

  errors = jax.lax.map(error, alphas)
  best = alphas[jnp.argmin(errors)]
  return ScaleSearch(best, awq_scales(absmean, best), errors)


class ClipSearch(NamedTuple):
  weight: jax.Array       # [out, in] float32, each group clamped to [r lo, r hi]
  ratio: jax.Array        # [out, G] chosen r
  errors: jax.Array       # [R, out, G] d H_gg d^T for each candidate ratio


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "clip_grid", "max_shrink"))
def search_clip(w: jax.Array, hessian: jax.Array, *, bits: int, group_size: int, sym: bool, clip_grid: int,
                max_shrink: float) -> ClipSearch:
  """Per output row and weight group of ``w [out, in]``, the clipping ratio minimizing the group's output error
  ``d H_gg d^T`` given the input ``hessian [in, in]`` (module docstring, step 2); a ``lax.map`` over the ratios
  (as in :func:`search_scale`)."""
  n = w.shape[1]
  wg = uniform.to_groups(w.astype(jnp.float32), group_size)                       # [out, G, g]
  ng, g = wg.shape[1:]
  hp = jnp.pad(hessian.astype(jnp.float32), ((0, ng * g - n),) * 2).reshape(ng, g, ng, g)
  hb = hp[jnp.arange(ng), :, jnp.arange(ng), :]                                   # [G, g, g] diagonal blocks
  lo = jnp.minimum(jnp.min(wg, axis=-1, keepdims=True), 0.0)
  hi = jnp.maximum(jnp.max(wg, axis=-1, keepdims=True), 0.0)
  if sym:
    hi = jnp.maximum(-lo, hi)
    lo = -hi
  ratios = 1.0 - jnp.arange(int(max_shrink * clip_grid), dtype=jnp.float32) / clip_grid

  def error(r):
    d = uniform.fake_quantize(jnp.clip(wg, r * lo, r * hi), bits, sym) - wg
    return jnp.einsum("ogi,gij,ogj->og", d, hb, d)

  errors = jax.lax.map(error, ratios)
  best = ratios[jnp.argmin(errors, axis=0)][..., None]                            # [out, G, 1]
  return ClipSearch(uniform.from_groups(jnp.clip(wg, best * lo, best * hi), n), best[..., 0], errors)


@jax.jit
def relative_error(w: jax.Array, w_hat: jax.Array, hessian: jax.Array) -> jax.Array:
  """``tr(D H D^T) / tr(W H W^T)``, ``D = w_hat - w``: the relative output error on the calibration inputs."""
  w = w.astype(jnp.float32)
  return output_error(w_hat.astype(jnp.float32) - w, hessian) / jnp.maximum(output_error(w, hessian), 1e-30)


def scale_layer(model: CausalLM, config: AWQConfig, prefix: str, layer: dict, x: jax.Array):
  """Searches and folds the AWQ scales of one decoder layer (float, function-preserving).

  ``layer``: parameters relative to the layer at ``prefix``; ``x [n, T, hidden]``: its calibration inputs.
  Returns ``(scaled layer, {linear path: H [in, in] of its input in the scaled layer}, {prev: alpha})`` for the
  linears matching ``config.targets``; a group is searched on its targeted linears and skipped if it has none.
  """
  fam = model.family
  names = capture.layer_linears(model, prefix, config.targets, [r for r, _ in fam.linears])
  owner = _input_owner(fam)
  stats = capture.collect_stats(model, layer, x, tuple(dict.fromkeys(owner[n] for n in names)),
                                        ("hessian", "absmean"))
  scales, alphas = {}, {}
  for group in scale_groups(model):
    quantized = [p for p in group.paths if p in names]
    if not quantized:
      continue
    flat = tree.flatten(layer)
    st = stats[owner[group.paths[0]]]
    found = search_scale(jnp.concatenate([flat[f"{p}/weight"] for p in quantized]), st["hessian"], st["absmean"],
                         n_grid=config.n_grid, **config.quantizer())
    if group.into_norm:
      layer = scaling.fold_into_norm(layer, fam, group.prev, found.scales)
    else:
      layer = scaling.fold_between_linears(layer, group.prev, group.paths[0], found.scales)
    scales.update(dict.fromkeys(group.paths, found.scales))
    alphas[group.prev] = float(found.alpha)
  hessians = {}
  for n in names:
    h = stats[owner[n]]["hessian"]
    hessians[n] = h / jnp.outer(scales[n], scales[n]) if n in scales else h
  return layer, hessians, alphas


@functools.partial(jax.jit, static_argnames=("config", "clip"))
def quantize_linear(w: jax.Array, hessian: jax.Array, *, config: AWQConfig, clip: bool):
  """Clips (if ``clip``) and RTN-quantizes one scaled linear ``w [out, in]`` whose input has ``hessian
  [in, in]``. Returns ``(QArray, relative output error)`` (the error against ``w``, i.e. against the original
  float linear, on the calibration inputs)."""
  wc = w
  if clip:
    wc = search_clip(w, hessian, clip_grid=config.clip_grid, max_shrink=config.max_shrink,
                     **config.quantizer()).weight.astype(w.dtype)
  q = rtn.quantize_weight(wc, scale_dtype=config.scale_dtype, **config.quantizer())
  return q, relative_error(w, q.dequantize(), hessian)


def quantize_layer(model: CausalLM, config: AWQConfig, layer: dict, hessians: dict[str, jax.Array]):
  """Clips (unless q/k or ``clip=False``) and RTN-quantizes the linears keyed in ``hessians`` (their inputs'
  Hessians in this layer). Returns ``(layer with QArrays, {path: relative output error})``."""
  role = {p: r for r, p in model.family.linears}
  flat = tree.flatten(layer)
  losses = {}
  for n, h in hessians.items():
    flat[f"{n}/weight"], err = quantize_linear(flat[f"{n}/weight"], h, config=config,
                                               clip=config.clip and role[n] not in _NO_CLIP)
    losses[n] = float(err)
  return tree.unflatten(flat), losses


@register_method(AWQConfig, name="awq", needs_calibration=True, mixed=False, streams=True)
def quantize(params, rules, *, model=None, calibration=None, progress: bool = True):
  """Model-level AWQ, the registered handler: ``(params, CalibrationReport)`` with the decoder linears of
  ``rules`` (a config on its targets, or ``{path: config}`` with one config: the scale search spans the linears
  that read one input) as QArrays (see :mod:`qjax.calibration.layerwise`). Post-LN OPT is rejected (its norms do not feed
  the linears)."""
  if calibration is None:
    raise InputError("AWQ needs calibration data")
  assignment = as_assignment(params, rules)
  if not assignment:
    return params, None
  config = dataclasses.replace(next(iter(assignment.values())), targets=exact_paths(assignment))
  model = calibration.model
  scaling.check_foldable(model.config)

  def process(i, prefix, layer, x):
    layer, hessians, alphas = scale_layer(model, config, prefix, layer, x)
    layer, losses = quantize_layer(model, config, layer, hessians)
    return layer, {**losses, **{f"alpha/{p}": a for p, a in alphas.items()}}

  return calibration.walk(params, process, propagate="fp", progress=progress,
                                     desc=f"AWQ W{config.bits}")
