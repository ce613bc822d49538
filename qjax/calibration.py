"""Layer-wise calibration shared by the calibration-based methods (GPTQ, SpQR; later AWQ, SmoothQuant, KVQuant).

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
from tqdm.auto import tqdm

from qjax import tree
from qjax.errors import InputError
from qjax.models import CausalLM, layers
from qjax.models.decoder import masks_and_positions


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Calibration data for one model: token ``windows [n, seqlen]`` int32."""
  model: CausalLM
  windows: np.ndarray


@dataclasses.dataclass
class LayerReport:
  layer: int
  seconds: float
  output_rel_error: float          # ||layer_q(x) - layer_fp(x)||^2 / ||layer_fp(x)||^2 on the calibration inputs
  linear_losses: dict[str, float]  # method-specific per-linear loss (GPTQ: sum of column losses)


@dataclasses.dataclass
class CalibrationReport:
  layers: list[LayerReport]
  seconds: float
  peak_host_bytes: int
  activation_bytes: int            # held activations: inputs + outputs of one layer


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


def _static_inputs(seqlen: int):
  ones = jnp.ones((1, seqlen), jnp.int32)
  mask, positions, _, _ = masks_and_positions(ones, None, None)
  return positions, mask


@functools.partial(jax.jit, static_argnums=0)
def _embed(model, params, ids):
  positions, _ = _static_inputs(ids.shape[1])
  return jax.lax.map(lambda row: model.embed(params, row[None], positions)[0], ids)


@functools.partial(jax.jit, static_argnums=0)
def run_layer(model, layer_params, x):
  """Decoder layer on each calibration window: ``x [n, T, hidden] -> [n, T, hidden]``."""
  positions, mask = _static_inputs(x.shape[1])
  mod = model.layer_module()
  return jax.lax.map(lambda xi: mod.apply({"params": layer_params}, xi[None], positions, mask)[0][0], x)


@functools.partial(jax.jit, static_argnums=(0, 3))
def collect_hessians(model, layer_params, x, names: tuple[str, ...]):
  """``{name: H [in, in]}`` float32 for the layer's linears at relative paths ``names`` (e.g. ``mlp/up_proj``).

  ``H = (2 / n) sum_{windows, tokens} x x^T``, accumulated with a scan over the ``n`` windows of ``x``.
  """
  positions, mask = _static_inputs(x.shape[1])
  mod = model.layer_module()

  def body(hs, xi):
    captured = {}

    def grab(next_fun, args, kwargs, context):
      name = "/".join(context.module.path)
      if isinstance(context.module, layers.Linear) and context.method_name == "__call__" and name in hs:
        captured[name] = args[0].reshape(-1, args[0].shape[-1]).astype(jnp.float32)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      mod.apply({"params": layer_params}, xi[None], positions, mask)
    return {n: hs[n] + captured[n].T @ captured[n] for n in hs}, None

  h0 = {n: jnp.zeros((_in_features(layer_params, n),) * 2, jnp.float32) for n in names}
  hs, _ = jax.lax.scan(body, h0, x)
  return {n: h * (2.0 / x.shape[0]) for n, h in hs.items()}


def _in_features(layer_params, name):
  w = tree.flatten(layer_params)[f"{name}/weight"]
  return w.shape[1]


QuantizeLinear = Callable[[str, jax.Array, jax.Array], tuple[object, float]]


def quantize_layerwise(params, calibration: Calibration, quantize_linear: QuantizeLinear, *,
                       targets: tuple[str, ...], true_sequential: bool = False, progress: bool = True,
                       desc: str = "calibrate"):
  """Quantizes the decoder linears matching ``targets`` layer by layer.

  ``quantize_linear(path, w [out, in], H [in, in]) -> (QArray, loss)`` is the method's per-matrix core.
  Returns the new parameter tree and a :class:`CalibrationReport`. The input tree is not modified.
  """
  model = calibration.model
  fam = model.family
  windows = jnp.asarray(calibration.windows, jnp.int32)
  check_memory_budget(model, *windows.shape)
  regs = [re.compile(t) for t in targets]
  start = time.perf_counter()
  flat = tree.flatten(params)
  x = _embed(model, params, windows)
  reports = []
  groups = fam.sequential if true_sequential else (tuple(r for r, _ in fam.linears),)
  for i in tqdm(range(model.config.num_layers), desc=desc, disable=not progress, leave=False):
    t0 = time.perf_counter()
    prefix = fam.layer_path(i)
    fp_layer = tree.unflatten({p[len(prefix) + 1:]: v for p, v in flat.items() if p.startswith(prefix + "/")})
    layer = fp_layer
    losses = {}
    for group in groups:
      names = tuple(fam.linear_path(r) for r in group
                    if any(rg.fullmatch(f"{prefix}/{fam.linear_path(r)}/weight") for rg in regs))
      if not names:
        continue
      hs = collect_hessians(model, layer, x, names)
      new = {}
      for n in names:
        new[f"{n}/weight"], losses[n] = quantize_linear(f"{prefix}/{n}/weight", tree.flatten(layer)[f"{n}/weight"],
                                                        hs[n])
      layer = tree.replace(layer, new, lambda p, _: new[p])
    y = run_layer(model, layer, x)
    y_fp = run_layer(model, fp_layer, x)
    rel = float(jnp.sum((y - y_fp) ** 2) / jnp.maximum(jnp.sum(y_fp**2), 1e-30))
    del y_fp
    for p, v in tree.flatten(layer).items():
      flat[f"{prefix}/{p}"] = v
    x = y
    reports.append(LayerReport(i, time.perf_counter() - t0, rel, losses))
  report = CalibrationReport(reports, time.perf_counter() - start, peak_host_bytes(),
                             activation_bytes(model, *windows.shape))
  return tree.unflatten(flat), report
