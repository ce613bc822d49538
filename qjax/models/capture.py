"""Running one decoder layer on calibration windows and looking inside it: the building blocks every layer-wise
method uses (the calibration pipeline that walks the layers is :mod:`qjax.calibration`).

``x [n, T, hidden]`` holds ``n`` windows of ``T`` tokens; each window is run separately (``lax.map`` /
``lax.scan``), so memory stays one window's activations however large ``n`` is. On a mesh (``model.mesh``) the
current layer's weights are gathered whole onto every device (FSDP-style: one layer at a time) and the windows
are split over every device (:func:`qjax.core.mesh.map_split`), so each window's activations have exactly the
one-device bits; the per-linear statistics are reduced in one fixed pairwise tree over the windows
(:func:`qjax.core.mesh.reduce_rows`), so the Hessians, and with them GPTQ's codes, equal one device's bit for bit
when the device count is a power of two dividing ``n``'s largest power-of-two factor (e.g. any of 1..128 devices
for ``n = 128``). A plain all-reduce would differ from one device in the last bit, and GPTQ's layer-by-layer
propagation of quantized outputs compounds such bits into flipped codes (~14% of them after 8 layers).
"""
from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.core import linalg
from qjax.core import mesh as meshlib
from qjax.core import tree
from qjax.models import CausalLM, layers
from qjax.models.decoder import window_inputs


@functools.partial(jax.jit, static_argnums=0)
def embed_windows(model, params, ids):
  positions, _ = window_inputs(ids.shape[1])   # a lookup (and an exact add): any partitioning gives the same bits
  return meshlib.map_rows(lambda row: model.embed(params, row[None], positions)[0], ids, model.mesh, meshlib.AXES)


@functools.partial(jax.jit, static_argnums=0)
def run_layer(model, layer_params, x):
  """Decoder layer on each calibration window: ``x [n, T, hidden] -> [n, T, hidden]``."""
  positions, mask = window_inputs(x.shape[1])
  mod = model.layer_module()
  return meshlib.map_split(lambda p, xi: mod.apply({"params": p}, xi[None], positions, mask)[0][0], layer_params, x,
                           model.mesh)


STATS = ("hessian", "absmax", "absmean")


def capture_linears(model, layer_params, x, names, *, outputs: bool = False) -> dict:
  """Runs one decoder layer on one window ``x [T, hidden]`` and returns ``{name: array [T, features]}``: the
  input (or, with ``outputs``, the output) of each linear at the relative paths ``names`` (a Flax method
  interceptor; nothing else is kept). Linears that read the same input (q/k/v, gate/up) get the same array
  object, so a caller can tell them apart with ``is``. Call it inside a scan over windows."""
  positions, mask = window_inputs(x.shape[0])
  captured, by_input = {}, {}

  def grab(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    name = "/".join(context.module.path)
    if isinstance(context.module, layers.Linear) and context.method_name == "__call__" and name in names:
      captured[name] = y[0] if outputs else by_input.setdefault(id(args[0]), args[0][0])
    return y

  with nn.intercept_methods(grab):
    model.layer_module().apply({"params": layer_params}, x[None], positions, mask)
  return captured


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def collect_stats(model, layer_params, x, names: tuple[str, ...], kinds: tuple[str, ...] = ("hessian",)):
  """``{name: {kind: stat}}`` float32 for the layer's linears at relative paths ``names`` (``mlp/up_proj``).

  Statistics of each linear's input ``x`` over all windows and tokens, reduced window by window in a fixed
  pairwise tree (:func:`qjax.core.mesh.reduce_rows`: no activation is stored, and a mesh gives the same bits):
  ``hessian`` ``H = (2 / n) sum x x^T [in, in]`` (GPTQ), ``absmax`` ``max |x| [in]`` (SmoothQuant), ``absmean``
  ``mean |x| [in]`` (AWQ); ``max`` / ``min`` scalars and ``moments`` ``[sum x, sum x^2, sum x^3, sum x^4]`` over
  every element (the analysis tools).

  Linears that read the same input (LLaMA's q/k/v and gate/up, OPT's q/k/v) share one accumulator: the
  statistics are computed once per distinct input and the same arrays returned for each such linear.
  """
  contribution = {"hessian": linalg.gram, "absmax": lambda a: jnp.max(jnp.abs(a), axis=0),
                  "absmean": lambda a: jnp.sum(jnp.abs(a), axis=0), "max": jnp.max, "min": jnp.min,
                  "moments": lambda a: jnp.stack([jnp.sum(a**k) for k in (1, 2, 3, 4)])}
  combine = {"absmax": jnp.maximum, "max": jnp.maximum, "min": jnp.minimum}
  source = shared_inputs(model, layer_params, x[0], names)
  distinct = tuple(dict.fromkeys(source.values()))

  def window(params, xi):
    captured = capture_linears(model, params, xi, names)
    captured = {n: captured[n].reshape(-1, captured[n].shape[-1]).astype(jnp.float32) for n in distinct}
    return {n: {k: contribution[k](captured[n]) for k in kinds} for n in distinct}

  def zeros(n, kind):
    d = _in_features(layer_params, n)
    shape = {"hessian": (d, d), "max": (), "min": (), "moments": (4,)}.get(kind, (d,))
    fill = {"absmax": -jnp.inf, "max": -jnp.inf, "min": jnp.inf}.get(kind, 0.0)
    return jnp.full(shape, fill, jnp.float32)

  pairs = lambda a, b: {n: {k: combine.get(k, jnp.add)(a[n][k], b[n][k]) for k in kinds} for n in distinct}
  init = {n: {k: zeros(n, k) for k in kinds} for n in distinct}
  acc = meshlib.reduce_rows(window, pairs, init, layer_params, x, model.mesh)
  scale = {"hessian": 2.0 / x.shape[0], "absmean": 1.0 / (x.shape[0] * x.shape[1])}
  stats = {n: {k: v * scale.get(k, 1.0) for k, v in s.items()} for n, s in acc.items()}
  return {n: stats[source[n]] for n in names}


def shared_inputs(model, layer_params, x, names) -> dict[str, str]:
  """``{name: the first of names whose linear reads the same input}`` (traced once on one window ``x [T,
  hidden]``, nothing computed)."""
  source = {}

  def trace(x):
    captured = capture_linears(model, layer_params, x, names)
    first = {}
    for n in names:
      source[n] = first.setdefault(id(captured[n]), n)
    return 0

  jax.eval_shape(trace, x)
  return source


def _in_features(layer_params, name):
  w = tree.flatten(layer_params)[f"{name}/weight"]
  return w.shape[1]


def layer_linears(model: CausalLM, prefix: str, targets: tuple[str, ...], roles) -> tuple[str, ...]:
  """Paths (relative to the layer) of the linears among ``roles`` whose weights match ``targets``."""
  fam = model.family
  regs = [re.compile(t) for t in targets]
  return tuple(fam.linear_path(r) for r in roles
               if any(rg.fullmatch(f"{prefix}/{fam.linear_path(r)}/weight") for rg in regs))
