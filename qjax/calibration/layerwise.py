"""Layer-wise calibration shared by the calibration-based methods (GPTQ, SpQR, AWQ, SmoothQuant, ZeroQuant's LKD,
KVQuant): :func:`walk_layers` visits the decoder layers in order with their calibration inputs,
:func:`qjax.models.capture.collect_stats` accumulates per-linear input statistics (a fixed pairwise tree over the
windows), :func:`quantize_layerwise` is GPTQ's pipeline on top of them.

As in the reference (GPTQ's ``llama_sequential``): the inputs of decoder layer 0 are captured for ``n`` windows of
``seqlen`` tokens; then, layer by layer, each linear's Hessian ``H = (2 / n) sum_{windows, tokens} x x^T`` is
accumulated in float32 over the windows (the reference sums them in order; qjax sums them in a fixed pairwise
tree, :func:`qjax.core.mesh.reduce_rows`, more accurate and the same bits on any mesh), the layer's linears are
quantized, and the quantized layer is run on the same inputs to produce the next layer's inputs. Only the current
layer's inputs and outputs are held (``2 * n * seqlen * hidden * 4`` bytes), never every layer's activations. With ``true_sequential`` the
linears are quantized in the family's sub-groups (LLaMA ``[q,k,v] -> [o] -> [gate,up] -> [down]``), the inputs of
each sub-group being recollected through the already quantized earlier sub-groups.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from qjax.calibration import training
from qjax.calibration.memory import activation_bytes, check_memory_budget, peak_host_bytes
from qjax.calibration.reports import CalibrationReport, LayerReport
from qjax.core import deferred
from qjax.core import mesh as meshlib
from qjax.core import tree
from qjax.core.progress import bar as progress_bar
from qjax.models import CausalLM, capture


class LayerStore(Protocol):
  """Where a streaming run puts each finished decoder layer (:class:`qjax.io.streaming.StagedLayers`): written as
  soon as it is done, then dropped from memory; a resumed run skips the layers already stored."""

  def finished(self) -> int:
    """How many leading layers are stored already (0 for a fresh run)."""

  def write(self, i: int, layer: dict, report: "LayerReport") -> dict:
    """Stores layer ``i`` (paths relative to it) with its report; returns its placeholder tree (Deferred leaves
    with the stored tensors' shapes and bytes)."""

  def stored(self, i: int) -> tuple[dict, "LayerReport"]:
    """``(placeholder tree, report)`` of a stored layer."""

  def load(self, i: int) -> dict:
    """A stored layer read back whole (one read of its part)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
  """Calibration data for one model, token ``windows [n, seqlen]`` int32, and the layer-wise pipeline over it.

  Methods receive this object as their ``calibration`` and drive the pipeline through its methods
  (:meth:`walk`, :meth:`quantize_layerwise`) rather than importing this package, so the engine that walks the
  layers (one device today; sharded or streaming later) can change without touching a method.
  """
  model: CausalLM
  windows: np.ndarray
  layer_report: bool = False   # measure each layer's output error (one more layer forward per layer)
  store: LayerStore | None = None   # streaming: finished layers written out, not kept (qjax.io.streaming)

  def placed_windows(self) -> jax.Array:
    """The windows as a device array, on ``model.mesh`` split over all its devices (each process of a
    ``jax.distributed`` run materializes only its own devices' windows)."""
    if self.model.mesh is None:
      return jnp.asarray(self.windows, jnp.int32)
    return meshlib.put_rows(np.asarray(self.windows, np.int32), self.model.mesh, meshlib.AXES)

  def with_model(self, model: CausalLM) -> "Calibration":
    """The same windows for another view of the model (other hooks or dtype)."""
    return dataclasses.replace(self, model=model)

  def walk(self, params, process: "LayerFn", *, propagate: str = "new", finish: "FinishFn | None" = None,
           progress: bool = True, desc: str = "calibrate"):
    """:func:`walk_layers` over these windows."""
    return walk_layers(params, self, process, propagate=propagate, finish=finish, progress=progress, desc=desc)

  def quantize_layerwise(self, params, quantize_linear: "QuantizeLinear", *, targets: tuple[str, ...],
                         true_sequential: bool = False, finish: "FinishFn | None" = None, progress: bool = True,
                         desc: str = "calibrate"):
    """:func:`quantize_layerwise` over these windows."""
    return quantize_layerwise(params, self, quantize_linear, targets=targets, true_sequential=true_sequential,
                              finish=finish, progress=progress, desc=desc)

  def train(self, loss_fn, params, config, *, frozen=None, activation_bytes: int = 0, progress: bool = True,
            desc: str = "train"):
    """:func:`qjax.calibration.training.train` on these windows (the quantization-aware methods' trainer)."""
    return training.train(loss_fn, params, self.windows, config, frozen=frozen, activation_bytes=activation_bytes,
                          progress=progress, desc=desc)


LayerFn = Callable[[int, str, dict, jax.Array], tuple[dict, dict[str, float]]]
FinishFn = Callable[[str, dict], dict]


def walk_layers(params, calibration: Calibration, process: LayerFn, *, propagate: str = "new",
                finish: FinishFn | None = None, progress: bool = True, desc: str = "calibrate"):
  """Runs ``process`` on every decoder layer in order, feeding each layer the calibration activations.

  ``process(i, prefix, layer_params, x [n, T, hidden]) -> (new_layer_params, losses)`` sees the layer's
  parameters (paths relative to ``prefix``, e.g. ``self_attn/q_proj/weight``) and its inputs. The next layer's
  inputs are the outputs of the new layer (``propagate="new"``, GPTQ's quantized-prefix order) or of the
  float layer (``"fp"``, the teacher's hidden states, as LKD uses). Returns ``(params, CalibrationReport)``.
  With ``calibration.layer_report`` the report has each layer's relative output error ``||new(x) - fp(x)||^2 /
  ||fp(x)||^2``, which costs running both layers; without it (the default) only the layer that ``propagate``
  names runs and the error is None. ``finish(prefix, layer) -> layer``: what is kept (or stored) of a layer once
  its outputs are computed, when that differs from what runs (SpQR runs dense reconstructions and keeps its
  SpQRArrays). The input tree is not modified.

  Streaming (``calibration.store``, :mod:`qjax.io.streaming`): ``params`` may hold :class:`qjax.core.deferred.Deferred`
  leaves; each layer's are read when the walk reaches it, the finished layer goes to the store and only its
  placeholders stay, so host memory holds one layer (plus the embeddings and the activations) at any depth. A
  resumed walk runs the stored layers on the calibration inputs (the same function on the same values: the same
  bits) and continues after them.
  """
  if propagate not in ("new", "fp"):
    raise ValueError(f"propagate must be 'new' or 'fp', got {propagate!r}")
  model = calibration.model
  fam = model.family
  store = calibration.store
  done = 0 if store is None else store.finished()
  windows = calibration.placed_windows()
  check_memory_budget(model, *windows.shape)
  start = time.perf_counter()
  flat = tree.flatten(params)
  x = capture.embed_windows(model, tree.unflatten({p: v for p, v in flat.items() if not deferred.is_deferred(v)}),
                            windows)
  reports = []
  for i in progress_bar(range(model.config.num_layers), desc=desc, enabled=progress):
    t0 = time.perf_counter()
    prefix = fam.layer_path(i)
    fp_layer = tree.subtree(flat, prefix)       # with Deferred leaves in a streaming run: read below, when needed
    if i < done:                                # resumed: the stored layer's outputs, nothing recomputed
      placeholders, report = store.stored(i)
      layer = store.load(i) if propagate == "new" else deferred.materialize(fp_layer)
      x = capture.run_layer(model, layer, x)
      layer = placeholders
    else:
      fp_layer = deferred.materialize(fp_layer)
      layer, losses = process(i, prefix, fp_layer, x)
      if layer is fp_layer or calibration.layer_report:
        y = capture.run_layer(model, layer, x)
        y_fp = y if layer is fp_layer else capture.run_layer(model, fp_layer, x)  # unchanged layers run once
        rel = float(jnp.sum((y - y_fp) ** 2) / jnp.maximum(jnp.sum(y_fp**2), 1e-30))
        x = y if propagate == "new" else y_fp
        del y, y_fp
      else:
        rel, x = None, capture.run_layer(model, layer if propagate == "new" else fp_layer, x)
      report = LayerReport(i, time.perf_counter() - t0, rel, losses)
      if finish is not None:
        layer = finish(prefix, layer)
      if store is not None:
        layer = store.write(i, layer, report)
    del fp_layer
    for p, v in tree.flatten(layer).items():
      flat[f"{prefix}/{p}"] = v
    reports.append(report)
  report = CalibrationReport(tuple(reports), time.perf_counter() - start, peak_host_bytes(),
                             activation_bytes(model, *windows.shape))
  return tree.unflatten(flat), report


QuantizeLinear = Callable[[str, jax.Array, jax.Array], tuple[object, float]]


def quantize_layerwise(params, calibration: Calibration, quantize_linear: QuantizeLinear, *,
                       targets: tuple[str, ...], true_sequential: bool = False, finish: FinishFn | None = None,
                       progress: bool = True, desc: str = "calibrate"):
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
      names = capture.layer_linears(model, prefix, targets, group)
      if not names:
        continue
      stats = capture.collect_stats(model, layer, x, names)
      new = {}
      for n in names:
        w = split_rows(model, tree.flatten(layer)[f"{n}/weight"])
        new[f"{n}/weight"], losses[n] = quantize_linear(f"{prefix}/{n}/weight", w, stats[n]["hessian"])
      layer = tree.replace(layer, new, lambda p, _: new[p])
    return layer, losses

  return walk_layers(params, calibration, process, finish=finish, progress=progress, desc=desc)


def split_rows(model: CausalLM, w):
  """``w [out, in]`` with its rows split over every device of ``model.mesh`` (both axes; None: unchanged). Row-wise
  methods given one shared Hessian (GPTQ, SpQR) then quantize each device's rows in parallel with no
  communication: XLA partitions the sweep along the rows it is given."""
  return meshlib.put_rows(w, model.mesh, ("data", "model"))
