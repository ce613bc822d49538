"""Layer-wise calibration shared by the calibration-based methods (GPTQ, SpQR, AWQ, SmoothQuant, ZeroQuant's LKD,
KVQuant): :func:`walk_layers` visits the decoder layers in order with their calibration inputs,
:func:`collect_stats` accumulates per-linear input statistics with a scan, :func:`quantize_layerwise` is GPTQ's
pipeline on top of them.

As in the reference (GPTQ's ``llama_sequential``): the inputs of decoder layer 0 are captured for ``n`` windows of
``seqlen`` tokens; then, layer by layer, each linear's Hessian ``H = (2 / n) sum_{windows, tokens} x x^T`` is
accumulated in float32 with a ``lax.scan`` over the windows, the layer's linears are quantized, and the quantized
layer is run on the same inputs to produce the next layer's inputs. Only the current layer's inputs and outputs
are held (``2 * n * seqlen * hidden * 4`` bytes), never every layer's activations. With ``true_sequential`` the
linears are quantized in the family's sub-groups (LLaMA ``[q,k,v] -> [o] -> [gate,up] -> [down]``), the inputs of
each sub-group being recollected through the already quantized earlier sub-groups.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import resource
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax import tree
from qjax.errors import InputError
from qjax.models import CausalLM, layers
from qjax.models.decoder import window_inputs
from qjax.progress import bar as progress_bar


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Calibration data for one model: token ``windows [n, seqlen]`` int32."""
  model: CausalLM
  windows: np.ndarray


@dataclasses.dataclass(frozen=True)
class LayerReport:
  layer: int
  seconds: float
  output_rel_error: float          # ||layer_q(x) - layer_fp(x)||^2 / ||layer_fp(x)||^2 on the calibration inputs
  linear_losses: dict[str, float]  # method-specific per-linear loss (GPTQ: sum of column losses)

  def to_dict(self) -> dict:
    return {"layer": self.layer, "seconds": self.seconds, "output_rel_error": self.output_rel_error,
            "linear_losses": dict(self.linear_losses)}


@dataclasses.dataclass(frozen=True)
class CalibrationReport:
  layers: tuple[LayerReport, ...]
  seconds: float
  peak_host_bytes: int
  activation_bytes: int            # held activations: inputs + outputs of one layer

  def to_dict(self) -> dict:
    """JSON-able: the totals and one entry per layer."""
    return {"seconds": self.seconds, "peak_host_bytes": self.peak_host_bytes,
            "activation_bytes": self.activation_bytes, "layers": [l.to_dict() for l in self.layers]}


def activation_bytes(model: CausalLM, nsamples: int, seqlen: int) -> int:
  """Bytes of one layer's calibration inputs plus outputs (float32)."""
  return 2 * nsamples * seqlen * model.config.hidden_size * 4


def check_memory_budget(model: CausalLM, nsamples: int, seqlen: int):
  """Fails up front when the held activations would not fit in available host memory."""
  need = activation_bytes(model, nsamples, seqlen)
  avail = _available_bytes()
  if avail is not None and need > 0.8 * avail:
    raise InputError(f"calibration needs {need / 2**30:.1f} GiB for activations ({nsamples} samples x {seqlen} "
                     f"tokens x {model.config.hidden_size} x 4 bytes x 2), more than 80% of the "
                     f"{avail / 2**30:.1f} GiB available: lower --nsamples or --calib-seqlen")


def _available_bytes():
  try:
    for line in open("/proc/meminfo"):
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def peak_host_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.partial(jax.jit, static_argnums=0)
def _embed(model, params, ids):
  positions, _ = window_inputs(ids.shape[1])
  return jax.lax.map(lambda row: model.embed(params, row[None], positions)[0], ids)


@functools.partial(jax.jit, static_argnums=0)
def run_layer(model, layer_params, x):
  """Decoder layer on each calibration window: ``x [n, T, hidden] -> [n, T, hidden]``."""
  positions, mask = window_inputs(x.shape[1])
  mod = model.layer_module()
  return jax.lax.map(lambda xi: mod.apply({"params": layer_params}, xi[None], positions, mask)[0][0], x)


STATS = ("hessian", "absmax", "absmean")


def capture_linears(model, layer_params, x, names, *, outputs: bool = False) -> dict:
  """Runs one decoder layer on one window ``x [T, hidden]`` and returns ``{name: array [T, features]}``: the
  input (or, with ``outputs``, the output) of each linear at the relative paths ``names`` (a Flax method
  interceptor; nothing else is kept). Call it inside a scan over windows."""
  positions, mask = window_inputs(x.shape[0])
  captured = {}

  def grab(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    name = "/".join(context.module.path)
    if isinstance(context.module, layers.Linear) and context.method_name == "__call__" and name in names:
      captured[name] = (y if outputs else args[0])[0]
    return y

  with nn.intercept_methods(grab):
    model.layer_module().apply({"params": layer_params}, x[None], positions, mask)
  return captured


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def collect_stats(model, layer_params, x, names: tuple[str, ...], kinds: tuple[str, ...] = ("hessian",)):
  """``{name: {kind: stat}}`` float32 for the layer's linears at relative paths ``names`` (``mlp/up_proj``).

  Statistics of each linear's input ``x`` over all windows and tokens, accumulated with a scan over the ``n``
  windows of ``x`` (no activation is stored): ``hessian`` ``H = (2 / n) sum x x^T [in, in]`` (GPTQ),
  ``absmax`` ``max |x| [in]`` (SmoothQuant), ``absmean`` ``mean |x| [in]`` (AWQ).
  """
  update = {"hessian": lambda acc, a: acc + a.T @ a,
            "absmax": lambda acc, a: jnp.maximum(acc, jnp.max(jnp.abs(a), axis=0)),
            "absmean": lambda acc, a: acc + jnp.sum(jnp.abs(a), axis=0)}

  def body(acc, xi):
    captured = capture_linears(model, layer_params, xi, names)
    captured = {n: a.reshape(-1, a.shape[-1]).astype(jnp.float32) for n, a in captured.items()}
    return {n: {k: update[k](acc[n][k], captured[n]) for k in kinds} for n in acc}, None

  def zeros(n, kind):
    d = _in_features(layer_params, n)
    return jnp.zeros((d, d) if kind == "hessian" else (d,), jnp.float32)

  acc, _ = jax.lax.scan(body, {n: {k: zeros(n, k) for k in kinds} for n in names}, x)
  scale = {"hessian": 2.0 / x.shape[0], "absmax": 1.0, "absmean": 1.0 / (x.shape[0] * x.shape[1])}
  return {n: {k: v * scale[k] for k, v in s.items()} for n, s in acc.items()}


def _in_features(layer_params, name):
  w = tree.flatten(layer_params)[f"{name}/weight"]
  return w.shape[1]


LayerFn = Callable[[int, str, dict, jax.Array], tuple[dict, dict[str, float]]]


def walk_layers(params, calibration: Calibration, process: LayerFn, *, propagate: str = "new",
                progress: bool = True, desc: str = "calibrate"):
  """Runs ``process`` on every decoder layer in order, feeding each layer the calibration activations.

  ``process(i, prefix, layer_params, x [n, T, hidden]) -> (new_layer_params, losses)`` sees the layer's
  parameters (paths relative to ``prefix``, e.g. ``self_attn/q_proj/weight``) and its inputs. The next layer's
  inputs are the outputs of the new layer (``propagate="new"``, GPTQ's quantized-prefix order) or of the
  float layer (``"fp"``, the teacher's hidden states, as LKD uses). Returns ``(params, CalibrationReport)``; the
  report has each layer's relative output error ``||new(x) - fp(x)||^2 / ||fp(x)||^2``. The input tree is not
  modified.
  """
  if propagate not in ("new", "fp"):
    raise ValueError(f"propagate must be 'new' or 'fp', got {propagate!r}")
  model = calibration.model
  fam = model.family
  windows = jnp.asarray(calibration.windows, jnp.int32)
  check_memory_budget(model, *windows.shape)
  start = time.perf_counter()
  flat = tree.flatten(params)
  x = _embed(model, params, windows)
  reports = []
  for i in progress_bar(range(model.config.num_layers), desc=desc, enabled=progress):
    t0 = time.perf_counter()
    prefix = fam.layer_path(i)
    fp_layer = tree.subtree(flat, prefix)
    layer, losses = process(i, prefix, fp_layer, x)
    y = run_layer(model, layer, x)
    y_fp = y if layer is fp_layer else run_layer(model, fp_layer, x)  # unchanged layers run once
    rel = float(jnp.sum((y - y_fp) ** 2) / jnp.maximum(jnp.sum(y_fp**2), 1e-30))
    x = y if propagate == "new" else y_fp
    del y, y_fp
    for p, v in tree.flatten(layer).items():
      flat[f"{prefix}/{p}"] = v
    reports.append(LayerReport(i, time.perf_counter() - t0, rel, losses))
  report = CalibrationReport(tuple(reports), time.perf_counter() - start, peak_host_bytes(),
                             activation_bytes(model, *windows.shape))
  return tree.unflatten(flat), report


def layer_linears(model: CausalLM, prefix: str, targets: tuple[str, ...], roles) -> tuple[str, ...]:
  """Paths (relative to the layer) of the linears among ``roles`` whose weights match ``targets``."""
  fam = model.family
  regs = [re.compile(t) for t in targets]
  return tuple(fam.linear_path(r) for r in roles
               if any(rg.fullmatch(f"{prefix}/{fam.linear_path(r)}/weight") for rg in regs))


QuantizeLinear = Callable[[str, jax.Array, jax.Array], tuple[object, float]]


def quantize_layerwise(params, calibration: Calibration, quantize_linear: QuantizeLinear, *,
                       targets: tuple[str, ...], true_sequential: bool = False, progress: bool = True,
                       desc: str = "calibrate"):
  """Quantizes the decoder linears matching ``targets`` layer by layer (:func:`walk_layers`).

  ``quantize_linear(path, w [out, in], H [in, in]) -> (QArray, loss)`` is the method's per-matrix core.
  Returns the new parameter tree and a :class:`CalibrationReport`.
  """
  model = calibration.model
  fam = model.family
  groups = fam.sequential if true_sequential else (tuple(r for r, _ in fam.linears),)

  def process(i, prefix, layer, x):
    losses = {}
    for group in groups:
      names = layer_linears(model, prefix, targets, group)
      if not names:
        continue
      stats = collect_stats(model, layer, x, names)
      new = {}
      for n in names:
        new[f"{n}/weight"], losses[n] = quantize_linear(f"{prefix}/{n}/weight", tree.flatten(layer)[f"{n}/weight"],
                                                        stats[n]["hessian"])
      layer = tree.replace(layer, new, lambda p, _: new[p])
    return layer, losses

  return walk_layers(params, calibration, process, progress=progress, desc=desc)
