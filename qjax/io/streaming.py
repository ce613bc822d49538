"""Streaming quantization: a model larger than host memory quantized layer by layer, straight into a checkpoint.

:func:`quantize_streaming` reads a float Hugging Face safetensors folder or a GGUF file with its decoder layers
left on disk (:class:`qjax.io.safetensors.SafetensorsTensor` / :class:`qjax.io.gguf_load.GGUFTensor` leaves,
memory-mapped and read, or dequantized, one layer at a time by the layer-wise calibration), runs a recipe of
one layer-wise calibrated weight method (GPTQ, SpQR, AWQ or ZeroQuant: the methods registered ``streams=True``)
and writes each finished layer into the output checkpoint's ``layers/<i>/`` part as soon as it is done
(:class:`StagedLayers`).
Peak host memory is about the embeddings and head, one layer in and out, and the calibration activations
(:func:`memory_estimate`, checked up front), whatever the depth.

The output is built in a staging folder next to it, ``.<name>.stream/``, and renamed into place only when every
layer and the rest of the checkpoint are written, so a destination path never holds a partial checkpoint. An
interrupted run leaves the staging folder; the same command with ``resume=True`` (``--resume``) checks that
source, recipe, calibration windows and dtype are the same (a fingerprint) and continues after the last
finished layer: the stored layers are run on the calibration inputs to rebuild the next layer's inputs (the
same function on the same values, so the same bits), and the result equals an uninterrupted run's exactly.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qjax.api.pipeline import Quantized, method_record, quantize_model
from qjax.api.recipe import Recipe
from qjax.calibration.layerwise import Calibration
from qjax.calibration.memory import activation_bytes, available_bytes
from qjax.calibration.reports import LayerReport
from qjax.core import tree
from qjax.core.deferred import Deferred, is_deferred
from qjax.core.errors import InputError
from qjax.core.formats.base import is_quantized
from qjax.io import checkpoint, gguf_load, hf
from qjax.io.quantized import layer_paths
from qjax.methods import registry
from qjax.models.config import DTYPES
from qjax.models.sharding import shard_params

STATE = "stream.json"


def staging_dir(dest) -> Path:
  """Where a streaming run to ``dest`` builds its checkpoint (and an interrupted one waits to be resumed)."""
  dest = Path(dest).absolute()
  return dest.parent / f".{dest.name}.stream"


def check_streamable(recipe: Recipe):
  """InputError unless ``recipe`` is one layer-wise calibrated weight method and nothing that needs the whole
  model at once (SmoothQuant, planted outliers, int8 weights, a KV cache, QAT)."""
  methods = {registry.method_for(r.config).name: registry.method_for(r.config) for r in recipe.weights
             if r.config is not None}
  extras = [n for n, v in (("SmoothQuant", recipe.smoothquant), ("planted outliers", recipe.outliers),
                           ("a KV-cache method", recipe.kv), ("--int8-kernel", recipe.int8_kernel)) if v]
  if extras:
    raise InputError(f"streaming runs one layer-wise weight method; this recipe also has {', '.join(extras)}")
  if len(methods) != 1 or not next(iter(methods.values())).streams:
    able = sorted(m.name for m in registry.methods().values() if m.streams)
    raise InputError(f"streaming runs one layer-wise calibrated weight method ({', '.join(able)}); this recipe has "
                     f"{', '.join(methods) or 'none'}")


@dataclasses.dataclass(frozen=True)
class StagedTensor(Deferred):
  """A finished layer's tensor in the checkpoint folder ``folder`` (the staging folder while the run goes on, the
  published checkpoint after it); :meth:`load` reads its layer part and returns this tensor."""
  folder: str
  layer: int
  path: str                       # relative to the layer
  shape: tuple[int, ...]
  dtype: str
  nbytes: int
  quantized: bool
  qarrays: str                    # JSON: the layer part's quantized-tensor metadata

  def load(self):
    part = checkpoint.read_layer(Path(self.folder), checkpoint.layer_part(self.layer), json.loads(self.qarrays))
    return tree.flatten(part)[self.path]


class StagedLayers:
  """The :class:`qjax.calibration.layerwise.LayerStore` of a streaming run: layer ``i`` becomes the checkpoint part
  ``layers/<i>/`` of the staging folder (written into a temporary sibling and renamed: a killed run never leaves
  half a layer), and ``stream.json`` records, after each layer, its report and stored tensors. ``finished()``
  counts the leading layers that are both written and recorded."""

  def __init__(self, folder: Path, fingerprint: dict):
    self.folder = folder
    state = folder / STATE
    if state.is_file():
      self.state = json.loads(state.read_text())
    else:
      self.state = {"fingerprint": fingerprint, "layers": {}}
      self._save_state()

  def finished(self) -> int:
    i = 0
    while str(i) in self.state["layers"] and (self.folder / checkpoint.layer_part(i)).is_dir():
      i += 1
    return i

  def write(self, i: int, layer: dict, report: LayerReport) -> dict:
    part = self.folder / checkpoint.layer_part(i)
    tmp = part.with_name(f".{i}.tmp")
    for p in (tmp, part):
      shutil.rmtree(p, ignore_errors=True)
    flat = {p: _host(v) for p, v in tree.flatten(layer).items()}
    qmeta = checkpoint.write_part(tmp, flat)
    os.replace(tmp, part)
    leaves = {p: {"shape": list(v.shape), "dtype": str(np.dtype(v.dtype)), "nbytes": int(v.nbytes),
                  "quantized": is_quantized(v)} for p, v in flat.items()}
    self.state["layers"][str(i)] = {"report": report.to_dict(), "qarrays": qmeta, "leaves": leaves}
    self._save_state()
    del flat, layer
    release_freed_memory()
    return self.stored(i)[0]

  def stored(self, i: int) -> tuple[dict, LayerReport]:
    entry = self.state["layers"][str(i)]
    qarrays = json.dumps(entry["qarrays"])
    placeholders = {p: StagedTensor(str(self.folder), i, p, tuple(d["shape"]), d["dtype"], d["nbytes"],
                                    d["quantized"], qarrays) for p, d in entry["leaves"].items()}
    r = entry["report"]
    report = LayerReport(r["layer"], r["seconds"], r["output_rel_error"], r["linear_losses"])
    return tree.unflatten(placeholders), report

  def load(self, i: int) -> dict:
    """A stored layer, read back (a resumed run's inputs of the next layer are computed from it)."""
    return checkpoint.read_layer(self.folder, checkpoint.layer_part(i), self.state["layers"][str(i)]["qarrays"])

  def written(self) -> dict:
    """``{part: its quantized tensors' metadata}`` of every stored layer (for the checkpoint's ``qjax.json``)."""
    return {checkpoint.layer_part(int(i)): e["qarrays"] for i, e in self.state["layers"].items()}

  def _save_state(self):
    tmp = self.folder / f".{STATE}.tmp"
    tmp.write_text(json.dumps(self.state, indent=1))
    os.replace(tmp, self.folder / STATE)


def release_freed_memory():
  """Hands the heap pages freed by the finished layer back to the OS (glibc ``malloc_trim``; elsewhere nothing).
  Without it the allocator's free lists, fragmented by XLA's and orbax's threads, can keep a layer's freed pages
  resident, and the peak then creeps up with depth instead of staying one layer's worth."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _host(v):
  """A finished layer's leaf as host arrays (a quantized tensor's fields too): the device copy is dropped."""
  return jax.tree.map(np.asarray, v)


def fingerprint(source: Path, recipe: Recipe, windows: np.ndarray, dtype: str) -> dict:
  """What a resumed run must share with the interrupted one: the source files (names, sizes, modification
  times), the recipe, the calibration windows (a hash) and the compute dtype."""
  files = [source] if source.is_file() else sorted(p for p in source.iterdir()
                                                    if p.is_file() and p.suffix in (".safetensors", ".json"))
  return {"source": str(source.resolve()),
          "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
          "recipe": json.loads(json.dumps(recipe.to_dict())), "dtype": dtype,   # as stream.json reads it back
          "windows": hashlib.sha256(np.ascontiguousarray(windows, np.int32).tobytes()).hexdigest()
                     + f":{windows.shape[0]}x{windows.shape[1]}"}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  resident_bytes: int       # parameters outside the decoder layers (embeddings, final norm, head), read up front
  layer_bytes: int          # the largest decoder layer, float, in the compute dtype
  activation_bytes: int     # calibration inputs + outputs of one layer
  total_bytes: int          # resident + 2 layers (float in, quantized out, counted as float) + activations

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StreamReport:
  """What a streaming run did besides quantizing: the checkpoint it wrote, the layers a resumed run found already
  finished (0 for a fresh run) and the up-front memory estimate."""
  path: Path
  resumed_layers: int
  memory: MemoryEstimate

  def to_dict(self) -> dict:
    return {"path": str(self.path), "resumed_layers": self.resumed_layers, "memory": self.memory.to_dict()}


def memory_estimate(model, params, nsamples: int, seqlen: int) -> MemoryEstimate:
  """Host memory a streaming run needs at its peak (see :class:`MemoryEstimate`)."""
  flat = tree.flatten(params)
  itemsize = jnp.dtype(DTYPES[model.dtype]).itemsize
  resident = sum(int(v.nbytes) for v in flat.values() if not is_deferred(v))
  per_layer = [sum(v.size * itemsize for p, v in flat.items() if p.startswith(prefix + "/"))
               for prefix in layer_paths(model)]
  acts = activation_bytes(model, nsamples, seqlen)
  layer = max(per_layer, default=0)
  return MemoryEstimate(resident, layer, acts, resident + 2 * layer + acts)


def quantize_streaming(source, recipe: Recipe, windows: np.ndarray, dest, *, dtype: str = "float32", mesh=None,
                       resume: bool = False, overwrite: bool = False, memory_budget_gb: float | None = None,
                       layer_report: bool = False, progress: bool = True) -> tuple[Quantized, StreamReport]:
  """Quantizes the float safetensors folder or GGUF file ``source`` with ``recipe`` (one layer-wise calibrated
  weight method) on the calibration ``windows [n, seqlen]`` and writes the checkpoint ``dest`` layer by layer
  (module docstring).

  Returns ``(Quantized, StreamReport)``; the Quantized's decoder-layer leaves are :class:`StagedTensor`
  placeholders of what was written (shapes and stored bytes; ``load()`` reads one back), its other leaves arrays.
  ``resume``: continue the interrupted run that left ``staging_dir(dest)``; without it such a folder is an error
  (nothing is overwritten by accident). ``memory_budget_gb``: fail up front when the estimate exceeds it.
  """
  check_streamable(recipe)
  source = Path(source)
  dest = checkpoint.check_destination(dest, overwrite, "output checkpoint").absolute()
  windows = np.asarray(windows, np.int32)
  model, params = hf.load_model(source, dtype, stream=True)
  if mesh is not None:
    model = model.with_mesh(mesh)
    params = shard_params(model, params)
  estimate = memory_estimate(model, params, *windows.shape)
  avail = available_bytes()
  for limit, what in ((None if memory_budget_gb is None else memory_budget_gb * 2**30, "the memory budget"),
                      (None if avail is None else 0.9 * avail, "90% of the available memory")):
    if limit is not None and estimate.total_bytes > limit:
      raise InputError(f"streaming needs about {estimate.total_bytes / 2**30:.2f} GiB (resident parameters "
                       f"{estimate.resident_bytes / 2**30:.2f}, 2 layers {2 * estimate.layer_bytes / 2**30:.2f}, "
                       f"activations {estimate.activation_bytes / 2**30:.2f}), more than {what} "
                       f"({limit / 2**30:.2f} GiB): lower --nsamples or --calib-seqlen")
  stage = staging_dir(dest)
  fp = fingerprint(source, recipe, windows, dtype)
  if stage.exists():
    if not resume:
      raise InputError(f"{stage} holds an interrupted streaming run to {dest}: pass --resume to continue it, or "
                       f"delete it to start over")
    old = json.loads((stage / STATE).read_text()).get("fingerprint") if (stage / STATE).is_file() else None
    if old != fp:
      differ = sorted(k for k in fp if old is None or old.get(k) != fp[k])
      raise InputError(f"cannot resume {stage}: its run had a different {', '.join(differ)}")
  elif resume:
    raise InputError(f"nothing to resume: {stage} does not exist (run without --resume)")
  stage.mkdir(parents=True, exist_ok=True)
  store = StagedLayers(stage, fp)
  resumed = store.finished()
  calibration = Calibration(model, windows, layer_report=layer_report, store=store)
  q = quantize_model(model, params, recipe, calibration=calibration, progress=progress)
  host = {p: v if is_deferred(v) else _host(v) for p, v in tree.flatten(q.params).items()}
  shutil.rmtree(stage / "params", ignore_errors=True)         # a run killed while finishing wrote part of it
  source_dir = gguf_load.hf_view(source) if gguf_load.is_gguf(source) else source
  checkpoint.write_folder(stage, tree.unflatten(host), source_dir=source_dir, dtype=model.dtype,
                          method=method_record(q), recipe=recipe.to_dict(), layer_paths=layer_paths(model),
                          written=store.written())
  (stage / STATE).unlink()
  checkpoint.publish_dir(stage, dest)
  moved = {p: dataclasses.replace(v, folder=str(dest)) if isinstance(v, StagedTensor) else v
           for p, v in tree.flatten(q.params).items()}
  return dataclasses.replace(q, params=tree.unflatten(moved)), StreamReport(dest, resumed, estimate)
