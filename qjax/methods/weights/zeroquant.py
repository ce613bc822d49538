"""ZeroQuant (Yao et al., 2022) as the reference runs it through DeepSpeed (notes section 2.6), with its bugs fixed.

Weights: DeepSpeed's symmetric quantizer per group of ``g`` consecutive input columns of one output row
(``g = in`` with ``group_size=-1``; the last group may be partial)::

    s = 2 max|W_g| / 2^b ;   q = clip(round(W_g / s), -2^(b-1), 2^(b-1) - 1) ;   W_hat_g = s q

(``max|W_g| = 0`` gives ``s = 1``, all-zero codes, instead of DeepSpeed's NaN). The precision is chosen by module,
the reference's "W4/8": ``bits_attn`` for the attention projections (q, k, v, o), ``bits_mlp`` for the MLP (LLaMA
gate, up, down; OPT fc1, fc2). Activations: the input of every decoder linear is fake-quantized per token with the
same formula (``abits``, dynamic; :meth:`ZeroQuantConfig.act_config`), so the quantized model must be run with
those hooks (``model.with_hooks(config.act_config().hooks())``).

Layer-wise knowledge distillation (LKD, ``lkd=True``): for each distilled layer ``l``, with the float teacher's
hidden states ``x = h_l`` as input (the reference's ``hidden_states[l]``) and the float layer's outputs
``y = layer_fp(x)`` as target, the layer's float parameters ``theta`` (linear weights, biases, norm weights) are
trained with AdamW on ``L(theta) = mean((layer_student(x; theta) - y)^2)`` over minibatches of ``lkd_batch``
calibration windows (a seeded reshuffle every epoch), where the student runs with fake-quantized weights and
activations (straight-through gradients); the trained weights are then quantized. Decoupled weight decay applies
to the linear weights only (the reference meant to exempt biases and norm weights; its ``RMSNorm.weight`` pattern
never matched). Differences from the reference, on purpose:

* Groups lie along one output row. DeepSpeed reshapes the flattened matrix to ``[quantize_groups, -1]``, so groups
  straddle rows whenever a row is not a multiple of the group length (LLaMA-3.1-8B gate/up: 3.5 rows per group).
* B1 fixed: the student and the teacher layers run with the causal mask (the reference calls the layers without
  one, so LKD trains bidirectional attention).
* B2 fixed: LKD runs in float32 whatever the checkpoint dtype (the reference trains bf16 parameters, where most
  5e-6 updates round away); the trained float32 weights are quantized directly (their QArrays dequantize to the
  checkpoint dtype), the other trained parameters (norms, biases) are cast back to their dtype.
* The learning rate decays from ``lkd_lr`` to 0 along a cosine (the reference keeps it constant). Much of the
  straight-through gradient is rounding noise, on which Adam's normalized steps random-walk: on stories260K at a
  constant rate (3e-5 .. 1e-4) a layer's output MSE bottoms out after ~100-200 steps and then climbs back (at
  1e-4, above its no-LKD value by step 600, for 4 of the 5 layers); with the decay the last step is about the
  best.
* Any set of layers can be distilled (``lkd_layers``; the reference hard-codes layer 31), and OPT's fc1/fc2 are
  quantized too (the reference's module pattern ``mlp`` only matches LLaMA).

LKD defaults (300 steps, lr 1e-4, 4 windows per step) are tuned on stories260K (64 wide, 128 windows of 256
tokens): each layer's output MSE falls to 40-60% of its no-LKD value and TinyStories ppl at W4/8A8 drops from
6.77 to 6.40 (fp 6.12). The reference's 600 steps at 5e-6 are meant for an 8B model.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from qjax.core import tree, uniform
from qjax.core.errors import InputError
from qjax.core.formats.base import is_quantized
from qjax.core.formats.qarray import QArray
from qjax.core.options import Flag, int_list, option
from qjax.core.progress import bar as progress_bar
from qjax.methods.activations.quantizers import ActQuantConfig, straight_through
from qjax.methods.registry import as_assignment, exact_paths, register_method
from qjax.methods.weights import flags
from qjax.models import ActivationHooks, CausalLM, capture
from qjax.models.decoder import window_inputs
from qjax.models.families import DECODER_LINEARS

ATTENTION_ROLES = ("q", "k", "v", "o")


def _codes(w: jax.Array, bits: int, group_size: int):
  """Float32 signed codes ``q [out, G, g]`` and scales ``[out, G, 1]`` of ``w [out, in]`` (module doc formula)."""
  wg = uniform.to_groups(w.astype(jnp.float32), group_size)     # zero padding cannot move max|w|
  absmax = jnp.max(jnp.abs(wg), axis=-1, keepdims=True)
  scale = jnp.where(absmax > 0, 2 * absmax / 2**bits, 1.0)
  half = 2 ** (bits - 1)
  return jnp.clip(jnp.round(uniform.true_divide(wg, scale)), -half, half - 1), scale


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "scale_dtype"))
def quantize_weight(w: jax.Array, *, bits: int, group_size: int = -1, scale_dtype: str | None = None) -> QArray:
  """ZeroQuant-quantizes ``w [out_features, in_features]`` (module doc formula, groups along each row).

  Returns a symmetric QArray (stored codes ``q + 2^(b-1)``, scales ``[out, G]`` in ``scale_dtype``, default
  ``w.dtype``) whose ``dequantize()`` is ``[out, in]`` in ``w.dtype``.
  """
  q, scale = _codes(w, bits, group_size)
  codes = uniform.from_groups(q + 2 ** (bits - 1), w.shape[1]).astype(jnp.uint8)
  return QArray.from_codes(codes, scale[..., 0], None, bits=bits, group_size=group_size, sym=True, dtype=w.dtype,
                           scale_dtype=scale_dtype or w.dtype)


def _fake(w, bits, group_size, scale_dtype):
  q, scale = _codes(w, bits, group_size)
  scale = scale.astype(scale_dtype or w.dtype).astype(jnp.float32)
  return uniform.from_groups(q * scale, w.shape[1]).astype(w.dtype)


def fake_quantize_weight(w: jax.Array, *, bits: int, group_size: int = -1,
                         scale_dtype: str | None = None) -> jax.Array:
  """``quantize_weight(w, ...).dequantize()`` computed in float (same ``[out, in]`` shape and dtype), with a
  straight-through gradient (identity), as DeepSpeed's ``SymQuantizer`` in quantization-aware training."""
  return straight_through(functools.partial(_fake, bits=bits, group_size=group_size, scale_dtype=scale_dtype), w)


@dataclasses.dataclass(frozen=True)
class ZeroQuantConfig:
  bits_attn: int = option(8, Flag("--zq-attn-bits", "attention (q, k, v, o) weight bits"))
  bits_mlp: int = option(4, flags.BITS)  # gate, up, down (LLaMA); fc1, fc2 (OPT)
  group_size: int = option(-1, flags.GROUP_SIZE)  # input columns per group along a row; -1 = one group per row
  # per-token dynamic symmetric activations (absmax scheme); 16 = off
  abits: int = option(8, Flag("--abits", external=True))
  lkd: bool = option(False, Flag("--zq-lkd", "layer-by-layer knowledge distillation (uses calibration)"))
  lkd_steps: int = option(300, Flag("--lkd-steps", "AdamW steps per distilled layer (reference: 600)",
                                    requires="lkd"))
  lkd_lr: float = option(1e-4, Flag("--lkd-lr", "peak learning rate, cosine decay (reference: 5e-6)",
                                    requires="lkd"))
  lkd_weight_decay: float = 1e-5
  lkd_batch: int = option(4, Flag("--lkd-batch", "calibration windows per step", requires="lkd"))
  # layers to distill (negative counts from the end); None = all
  lkd_layers: tuple[int, ...] | None = option(None, Flag("--lkd-layers", "comma-separated layer indices to "
                                                         "distill, negative from the end (default all)",
                                                         parse=int_list, requires="lkd"))
  seed: int = option(0, Flag("--seed", external=True))  # minibatch sampling
  scale_dtype: str = "float16"        # storage type of the per-group scales
  targets: tuple[str, ...] = DECODER_LINEARS  # regexes (full match) over parameter paths

  def __post_init__(self):
    for name in ("bits_attn", "bits_mlp"):
      if not 2 <= getattr(self, name) <= 8:
        raise InputError(f"{name} must be between 2 and 8, got {getattr(self, name)}")
    if not (2 <= self.abits <= 8 or self.abits == 16):
      raise InputError(f"activation bits must be between 2 and 8, or 16 (off), got {self.abits}")
    if self.group_size == 0 or self.group_size < -1:
      raise InputError(f"group size must be -1 or positive, got {self.group_size}")
    if self.lkd_steps < 1 or self.lkd_batch < 1:
      raise InputError(f"LKD steps and batch must be positive, got {self.lkd_steps} and {self.lkd_batch}")
    if not self.lkd_lr > 0 or self.lkd_weight_decay < 0:
      raise InputError(f"LKD needs lr > 0 and weight decay >= 0, got {self.lkd_lr} and {self.lkd_weight_decay}")

  def act_config(self) -> ActQuantConfig:
    """Activation quantization to run the quantized model with: linear inputs, per token, DeepSpeed absmax."""
    return ActQuantConfig(bits=self.abits, sym=True, scheme="absmax")

  def layer_bits(self, model: CausalLM, prefix: str) -> tuple[tuple[str, int], ...]:
    """``((linear path inside the layer, bits), ...)`` for the targeted linears of the layer at ``prefix``."""
    fam = model.family
    roles = tuple(r for r, _ in fam.linears)
    names = capture.layer_linears(model, prefix, self.targets, roles)
    role_of = {p: r for r, p in fam.linears}
    return tuple((n, self.bits_attn if role_of[n] in ATTENTION_ROLES else self.bits_mlp) for n in names)

  def distilled(self, num_layers: int) -> frozenset[int]:
    """Indices of the layers LKD trains (empty without LKD)."""
    if not self.lkd:
      return frozenset()
    if self.lkd_layers is None:
      return frozenset(range(num_layers))
    bad = [i for i in self.lkd_layers if not -num_layers <= i < num_layers]
    if bad:
      raise InputError(f"LKD layers {bad} out of range for a model with {num_layers} layers")
    return frozenset(i % num_layers for i in self.lkd_layers)


def _quantize_layer(layer_params, bits: tuple[tuple[str, int], ...], config: ZeroQuantConfig):
  """The layer's tree with each ``(path, bits)`` linear weight replaced by its QArray (already quantized kept)."""
  flat = tree.flatten(layer_params)
  new = {f"{n}/weight": quantize_weight(flat[f"{n}/weight"], bits=b, group_size=config.group_size,
                                        scale_dtype=config.scale_dtype)
         for n, b in bits if not is_quantized(flat[f"{n}/weight"])}
  return tree.replace(layer_params, new, lambda p, _: new[p])


@register_method(ZeroQuantConfig, name="zeroquant", needs_calibration=lambda c: c.lkd, mixed=False, streams=True)
def quantize(params, rules, *, model: CausalLM | None = None, calibration=None, progress: bool = True):
  """Model-level ZeroQuant, the registered handler: ``(params, report)`` with the decoder linears of ``rules``
  (a config on its targets, or ``{path: config}`` with one config) as QArrays, W4/8 by module. With
  ``calibration`` (required for LKD) each layer is measured, and distilled where asked
  (:func:`_quantize_calibrated`); without it the weights are quantized directly (report ``None``; ``model`` gives
  the architecture). Run the result with ``model.with_hooks(config.act_config().hooks())`` for the activation
  quantization."""
  assignment = as_assignment(params, rules)
  if not assignment:
    return params, None
  config = dataclasses.replace(next(iter(assignment.values())), targets=exact_paths(assignment))
  if calibration is not None:
    return _quantize_calibrated(params, config, calibration, progress)
  if config.lkd:
    raise InputError("ZeroQuant's LKD needs calibration data")
  if model is None:
    raise ValueError("ZeroQuant without calibration needs the model (architecture)")
  return _quantize_plain(params, config, model, progress), None


def _quantize_plain(params, config: ZeroQuantConfig, model: CausalLM, progress: bool):
  fam = model.family
  flat = tree.flatten(params)
  for i in progress_bar(range(model.config.num_layers), desc="ZeroQuant", enabled=progress):
    prefix = fam.layer_path(i)
    layer = tree.subtree(flat, prefix)
    for p, v in tree.flatten(_quantize_layer(layer, config.layer_bits(model, prefix), config)).items():
      flat[f"{prefix}/{p}"] = v
  return tree.unflatten(flat)


def _fake_layer(layer_params, bits, group_size, scale_dtype):
  """The layer's tree with each ``(path, bits)`` linear weight fake-quantized (straight-through gradient)."""
  flat = tree.flatten(layer_params)
  new = {f"{n}/weight": fake_quantize_weight(flat[f"{n}/weight"], bits=b, group_size=group_size,
                                             scale_dtype=scale_dtype) for n, b in bits}
  return tree.replace(layer_params, new, lambda p, _: new[p])


@functools.partial(jax.jit, static_argnames=("student", "bits", "group_size", "scale_dtype"))
def student_outputs(student: CausalLM, layer_params, x: jax.Array, *, bits: tuple[tuple[str, int], ...],
                    group_size: int, scale_dtype: str) -> jax.Array:
  """The LKD student: decoder layer on ``x [b, T, hidden]`` with the linears ``bits`` fake-quantized (STE), the
  activation quantizers of ``student.hooks`` and the causal mask. Returns ``[b, T, hidden]``."""
  positions, mask = window_inputs(x.shape[1])
  fq = _fake_layer(layer_params, bits, group_size, scale_dtype)
  return student.layer_module().apply({"params": fq}, x, positions, mask)[0]


@functools.partial(jax.jit, static_argnames=("student", "bits", "group_size", "scale_dtype", "steps", "batch"))
def distill_layer(student: CausalLM, layer_params, x: jax.Array, y: jax.Array, key: jax.Array, lr, weight_decay,
                  *, bits: tuple[tuple[str, int], ...], group_size: int, scale_dtype: str, steps: int, batch: int):
  """LKD of one layer: ``steps`` AdamW steps (a ``lax.scan``) on ``mean((student(x_B) - y_B)^2)``, the learning
  rate decaying from ``lr`` to 0 along a cosine.

  ``x, y [n, T, hidden]`` float32 are the teacher's inputs and outputs of the layer; each step takes ``batch``
  windows ``B`` (``batch <= n``) from a permutation of the ``n`` windows redrawn every ``n // batch`` steps
  (``fold_in(key, epoch)``). Weight decay applies to 2-D parameters (linear weights) only. Returns the trained
  float32 ``layer_params`` and the per-step losses ``[steps]``.
  """
  n = x.shape[0]
  per_epoch = n // batch
  opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay,
                    mask=lambda p: jax.tree.map(lambda a: a.ndim == 2, p))

  def loss_fn(p, xb, yb):
    out = student_outputs(student, p, xb, bits=bits, group_size=group_size, scale_dtype=scale_dtype)
    return jnp.mean((out - yb) ** 2)

  def step(carry, s):
    p, state = carry
    perm = jax.random.permutation(jax.random.fold_in(key, s // per_epoch), n)
    idx = jax.lax.dynamic_slice_in_dim(perm, (s % per_epoch) * batch, batch)
    loss, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
    updates, state = opt.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), loss

  (layer_params, _), losses = jax.lax.scan(step, (layer_params, opt.init(layer_params)), jnp.arange(steps))
  return layer_params, losses


@functools.partial(jax.jit, static_argnums=0)
def layer_mse(model: CausalLM, layer_params, x: jax.Array, y: jax.Array) -> jax.Array:
  """``mean((layer(x) - y)^2)`` over ``x, y [n, T, hidden]`` (a ``lax.map`` over windows; causal mask)."""
  positions, mask = window_inputs(x.shape[1])
  mod = model.layer_module()

  def one(xy):
    out = mod.apply({"params": layer_params}, xy[0][None], positions, mask)[0][0]
    return jnp.sum((out.astype(jnp.float32) - xy[1]) ** 2)

  return jnp.sum(jax.lax.map(one, (x, y))) / y.size


def _cast_like(layer_params, like):
  """``layer_params`` with each leaf in the dtype of the same leaf of ``like`` (a QArray's dequantized dtype)."""
  dtypes = {p: jnp.dtype(v.dtype) for p, v in tree.flatten(like).items()}
  return tree.unflatten({p: dataclasses.replace(v, dtype=dtypes[p].name) if is_quantized(v) else v.astype(dtypes[p])
                         for p, v in tree.flatten(layer_params).items()})


def _quantize_calibrated(params, config: ZeroQuantConfig, calibration, progress: bool):
  """ZeroQuant with calibration, optional LKD: ``(params, CalibrationReport)``.

  Layers are visited by :func:`qjax.calibration.layerwise.walk_layers` with ``propagate="fp"`` (each layer's inputs are the
  float teacher's hidden states). Every layer's ``losses`` hold the output MSE of the quantized layer (W and A
  quantized) against the float layer on all calibration windows: ``{"mse": ...}`` for a layer that is only
  quantized, ``{"mse_before": ..., "mse_after": ...}`` (without / with LKD) for a distilled one. The report's
  ``output_rel_error`` is measured by ``walk_layers`` without activation quantization (weights only). Besides
  what ``walk_layers`` holds, each layer's float32 teacher outputs ``[n, T, hidden]`` are held while it is
  processed.
  """
  if any(is_quantized(v) for v in tree.flatten(params).values()):
    raise InputError("ZeroQuant with calibration needs a float checkpoint; this one is already quantized")
  f32 = dataclasses.replace(calibration.model, dtype="float32", hooks=ActivationHooks())
  teacher_calib = dataclasses.replace(calibration, model=calibration.model.with_hooks(ActivationHooks()))
  student = f32.with_hooks(config.act_config().hooks())
  distilled = config.distilled(f32.config.num_layers)
  key = jax.random.PRNGKey(config.seed)

  def process(i, prefix, layer, x):
    bits = config.layer_bits(f32, prefix)
    x = x.astype(jnp.float32)
    layer32 = jax.tree.map(lambda a: a.astype(jnp.float32), layer)
    y = capture.run_layer(f32, layer32, x)
    plain = _quantize_layer(layer, bits, config)
    before = float(layer_mse(student, plain, x, y))
    if i not in distilled:
      return plain, {"mse": before}
    trained, _ = distill_layer(student, layer32, x, y, jax.random.fold_in(key, i), config.lkd_lr,
                               config.lkd_weight_decay, bits=bits, group_size=config.group_size,
                               scale_dtype=config.scale_dtype, steps=config.lkd_steps,
                               batch=min(config.lkd_batch, x.shape[0]))
    trained = _cast_like(_quantize_layer(trained, bits, config), layer)
    return trained, {"mse_before": before, "mse_after": float(layer_mse(student, trained, x, y))}

  return teacher_calib.walk(params, process, propagate="fp", progress=progress,
                                     desc=f"ZeroQuant W{config.bits_mlp}/{config.bits_attn}A{config.abits}")
