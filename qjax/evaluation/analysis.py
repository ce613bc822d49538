"""The reference's analysis tools (its ``--analyze_stats`` and ``--get_layerwise_distance``, notes section 3.5): where
a model's outliers are, and how far a quantized model's linears drift from the float model's.

:func:`linear_stats`: per decoder linear, statistics of its input activations over calibration windows (max,
min, mean, std, excess kurtosis ``E[(x - mu)^4] / E[(x - mu)^2]^2 - 3``, the share of input channels whose
``max |x|`` reaches ``outlier_threshold`` (LLM.int8's 6.0), the channels with the largest ``max |x|``, and the
per-channel maxima) and of its weight (max, min, mean, std, kurtosis). The activations come from one float forward
per layer (:meth:`qjax.calibration.Calibration.walk`, statistics accumulated with a scan over windows, nothing
stored; moments are float32 sums of ``x^k``). :func:`write_stats` saves them as CSV with PNG heatmaps (layers x
linears: input max and kurtosis) and a plot of the per-channel input maxima of the linear with the largest one.

:func:`layerwise_distance`: per linear, SQNR ``10 log10(sum a^2 / sum (a - b)^2)`` (``inf`` when equal) and MSE of
the quantized model's input and output against the float model's on the same window. The float reference runs
without ANY activation, attention or KV quantizer (the reference leaves its attention quantizers on there, its bug
B6). :func:`write_distance` saves CSV and a PNG of SQNR over depth.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from qjax.core import tree
from qjax.core.formats.base import is_quantized
from qjax.models import ActivationHooks, capture, layers

OUTLIER_THRESHOLD = 6.0


def _moments(n: float, s1: float, s2: float, s3: float, s4: float) -> tuple[float, float, float]:
  """``(mean, std, excess kurtosis)`` from raw power sums over ``n`` elements (float64)."""
  mu = s1 / n
  var = max(s2 / n - mu * mu, 0.0)
  m4 = s4 / n - 4 * mu * s3 / n + 6 * mu * mu * s2 / n - 3 * mu**4
  return mu, math.sqrt(var), (m4 / (var * var) - 3.0) if var > 0 else float("nan")


def _weight_stats(w) -> dict:
  w = np.asarray(w.dequantize() if is_quantized(w) else w, np.float64)
  mu, sd = float(w.mean()), float(w.std())
  kurt = float(np.mean((w - mu) ** 4) / sd**4 - 3) if sd > 0 else float("nan")
  return {"w_max": float(w.max()), "w_min": float(w.min()), "w_mean": mu, "w_std": sd, "w_kurtosis": kurt}


def linear_stats(calibration, params, *, outlier_threshold: float = OUTLIER_THRESHOLD, top: int = 4,
                 progress: bool = True) -> list[dict]:
  """One row per decoder linear (``layer``, ``linear`` path within the layer, ``x_*`` and ``w_*`` statistics,
  ``x_top_channels``, and ``x_channel_absmax``: the per-channel ``max |x|`` as a list) of the model of
  ``calibration`` with ``params``, in layer order."""
  model = calibration.model
  fam = model.family
  names = tuple(fam.linear_path(r) for r, _ in fam.linears)
  rows = []

  def process(i, prefix, layer, x):
    stats = capture.collect_stats(model, layer, x, names, ("absmax", "max", "min", "moments"))
    flat = tree.flatten(layer)
    for n in names:
      s = {k: np.asarray(v, np.float64) for k, v in stats[n].items()}
      count = x.shape[0] * x.shape[1] * s["absmax"].shape[0]
      mu, sd, kurt = _moments(count, *s["moments"])
      chan = s["absmax"]
      rows.append({"layer": i, "linear": n, "x_max": float(s["max"]), "x_min": float(s["min"]), "x_mean": mu,
                   "x_std": sd, "x_kurtosis": kurt, "x_absmax": float(chan.max()),
                   "x_outlier_share": float(np.mean(chan >= outlier_threshold)),
                   "x_top_channels": [int(c) for c in np.argsort(-chan, kind="stable")[:top]],
                   **_weight_stats(flat[f"{n}/weight"]), "x_channel_absmax": chan.tolist()})
    return layer, {}

  calibration.walk(params, process, propagate="fp", progress=progress, desc="analyze stats")
  return rows


_CSV_SKIP = ("x_channel_absmax",)


def _write_csv(path: Path, rows: list[dict]):
  keys = [k for k in rows[0] if k not in _CSV_SKIP]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, keys)
    w.writeheader()
    for r in rows:
      w.writerow({k: ";".join(map(str, r[k])) if isinstance(r[k], list) else r[k] for k in keys})


def _heatmap(path: Path, rows: list[dict], key: str, title: str, log: bool = False):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  layers_ = sorted({r["layer"] for r in rows})
  linears = list(dict.fromkeys(r["linear"] for r in rows))
  grid = np.full((len(layers_), len(linears)), np.nan)
  for r in rows:
    grid[layers_.index(r["layer"]), linears.index(r["linear"])] = r[key]
  if log:
    grid = np.log10(np.maximum(grid, 1e-12))
  fig, ax = plt.subplots(figsize=(1.2 * len(linears) + 2, 0.3 * len(layers_) + 2))
  im = ax.imshow(grid, aspect="auto", cmap="viridis")
  ax.set_xticks(range(len(linears)), [n.split("/")[-1] for n in linears], rotation=45, ha="right")
  ax.set_yticks(range(len(layers_)), layers_)
  ax.set_ylabel("decoder layer")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label=("log10 " if log else "") + key)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_stats(folder, rows: list[dict]) -> dict[str, str]:
  """``stats.csv``, ``input_absmax.png``, ``input_kurtosis.png`` and ``worst_channels.png`` (the per-channel input
  maxima of the linear with the largest input ``max |x|``) in ``folder``; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  out = {"csv": folder / "stats.csv", "absmax": folder / "input_absmax.png",
         "kurtosis": folder / "input_kurtosis.png", "worst": folder / "worst_channels.png"}
  _write_csv(out["csv"], rows)
  _heatmap(out["absmax"], rows, "x_absmax", "input max |x| per linear", log=True)
  _heatmap(out["kurtosis"], rows, "x_kurtosis", "input excess kurtosis per linear")
  worst = max(rows, key=lambda r: r["x_absmax"])
  fig, ax = plt.subplots(figsize=(10, 3))
  ax.plot(worst["x_channel_absmax"], lw=0.8)
  ax.set_xlabel("input channel")
  ax.set_ylabel("max |x|")
  ax.set_yscale("log")
  ax.set_title(f"layer {worst['layer']} {worst['linear']}: per-channel input max")
  fig.tight_layout()
  fig.savefig(out["worst"], dpi=100)
  plt.close(fig)
  return {k: str(v) for k, v in out.items()}


def _captured(model, params, ids):
  """``{linear path: (input, output)}`` of every linear of the whole model run on ``ids [1, T]``."""
  got = {}

  def grab(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if isinstance(context.module, layers.Linear) and context.method_name == "__call__":
      got["/".join(context.module.path)] = (args[0], y)
    return y

  with nn.intercept_methods(grab):
    model.hidden(params, ids)
  return got


def sqnr(a: np.ndarray, b: np.ndarray) -> float:
  """``10 log10(sum a^2 / sum (a - b)^2)`` in float64; ``inf`` when ``a == b``."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = float(np.sum((a - b) ** 2))
  return math.inf if err == 0 else 10 * math.log10(float(np.sum(a * a)) / err)


def layerwise_distance(float_model, float_params, model, params, ids) -> list[dict]:
  """Per linear of the decoder (``path``, ``layer``): SQNR and MSE of ``model``'s (quantized) input and output
  against the float model's (all hooks removed) on the window ``ids [1, T]``."""
  clean = float_model.with_hooks(ActivationHooks())
  ref = jax.jit(lambda p, i: _captured(clean, p, i))(float_params, ids)
  got = jax.jit(lambda p, i: _captured(model, p, i))(params, ids)
  rows = []
  for path, (x_ref, y_ref) in ref.items():
    x, y = got[path]
    parts = path.split("/")
    layer = next((int(p.split("_")[-1]) for p in parts if p.startswith("layers_")), -1)
    x_ref, y_ref, x, y = (np.asarray(a, np.float64) for a in (x_ref, y_ref, x, y))
    rows.append({"path": path, "layer": layer, "linear": "/".join(parts[-2:]),
                 "input_sqnr_db": sqnr(x_ref, x), "input_mse": float(np.mean((x_ref - x) ** 2)),
                 "output_sqnr_db": sqnr(y_ref, y), "output_mse": float(np.mean((y_ref - y) ** 2))})
  return rows


def write_distance(folder, rows: list[dict]) -> dict[str, str]:
  """``layerwise_distance.csv`` and ``layerwise_sqnr.png`` (output SQNR over depth, one line per linear)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  out = {"csv": folder / "layerwise_distance.csv", "png": folder / "layerwise_sqnr.png"}
  _write_csv(out["csv"], rows)
  fig, ax = plt.subplots(figsize=(8, 4))
  for linear in dict.fromkeys(r["linear"] for r in rows if r["layer"] >= 0):
    pts = [(r["layer"], r["output_sqnr_db"]) for r in rows if r["linear"] == linear and math.isfinite(
        r["output_sqnr_db"])]
    if pts:
      ax.plot(*zip(*pts), marker=".", label=linear.split("/")[-1])
  ax.set_xlabel("decoder layer")
  ax.set_ylabel("output SQNR (dB)")
  ax.legend(fontsize=7, ncol=2)
  ax.set_title("quantized vs float linear outputs")
  fig.tight_layout()
  fig.savefig(out["png"], dpi=100)
  plt.close(fig)
  return {k: str(v) for k, v in out.items()}
