"""The analysis tools: ``--analyze-stats`` finds planted outlier channels; ``--layerwise-distance`` measures the
quantized linears against the float ones (independent: NumPy SQNR on the captured arrays, equal inputs are inf)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from qjax.calibration import Calibration
from qjax.evaluation import analysis
from qjax.io.hf import load_model
from qjax.methods.activations import outliers
from qjax.methods.weights import rtn

REPO = Path(__file__).resolve().parents[2]


def test_stats_flag_planted_channels_and_moments(stories_dir):
  model, params = load_model(stories_dir)
  cfg = outliers.OutlierConfig(channels=4, factor=50.0)
  planted = set(int(c) for c in outliers.outlier_channels(model.config.hidden_size, cfg))
  windows = np.random.default_rng(0).integers(3, 500, (3, 48)).astype(np.int32)
  rows = analysis.linear_stats(Calibration(model, windows), outliers.plant_outliers(model, params, cfg),
                               progress=False)
  attn = [r for r in rows if r["linear"].startswith("self_attn/") and not r["linear"].endswith("o_proj")]
  assert len(attn) == 3 * model.config.num_layers
  assert all(set(r["x_top_channels"]) == planted for r in attn)
  clean = analysis.linear_stats(Calibration(model, windows), params, progress=False)
  assert not any(set(r["x_top_channels"]) == planted for r in clean if r["linear"] == "self_attn/q_proj")
  # moments against NumPy on the captured input of layer 0's q_proj
  from qjax.core import tree
  from qjax.models import capture
  x = capture.embed_windows(model, params, jnp.asarray(windows))
  layer = tree.subtree(tree.flatten(params), model.family.layer_path(0))
  a = np.concatenate([np.asarray(capture.capture_linears(model, layer, xi, ("self_attn/q_proj",))[
      "self_attn/q_proj"], np.float64).ravel() for xi in x])
  r0 = next(r for r in clean if r["layer"] == 0 and r["linear"] == "self_attn/q_proj")
  kurt = np.mean((a - a.mean()) ** 4) / a.var() ** 2 - 3
  np.testing.assert_allclose([r0["x_mean"], r0["x_std"], r0["x_kurtosis"], r0["x_max"]],
                             [a.mean(), a.std(), kurt, a.max()], rtol=2e-3, atol=1e-5)


def test_layerwise_distance_and_cli(stories_dir, tmp_path):
  model, params = load_model(stories_dir)
  q, _ = rtn.quantize(params, rtn.RTNConfig(bits=3, group_size=32), progress=False)
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 500, (1, 40)), jnp.int32)
  rows = analysis.layerwise_distance(model, params, model, q, ids)
  first = {r["linear"]: r for r in rows if r["layer"] == 0}
  assert first["self_attn/q_proj"]["input_sqnr_db"] == float("inf")      # layer 0's attention input is exact
  assert all(np.isfinite(r["output_sqnr_db"]) and r["output_mse"] > 0 for r in rows)
  assert abs(analysis.sqnr(np.ones(4), np.ones(4) * 1.1) - 20.0) < 1e-9 and analysis.sqnr(np.ones(3), np.ones(3)) == np.inf
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  p = subprocess.run([sys.executable, "-m", "qjax.quantize", "--method", "rtn", "--wbits", "3", "--groupsize", "32",
                      "--plant-outliers", "4", "--eval", "none", "--no-progress", "--analyze-stats", tmp_path / "s",
                      "--layerwise-distance", tmp_path / "d", "--json", tmp_path / "o.json"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr
  out = json.loads((tmp_path / "o.json").read_text())["analysis"]
  assert all(Path(f).is_file() for tool in out.values() for f in tool.values())
  with open(tmp_path / "s" / "stats.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 5 * 7 and {"x_kurtosis", "x_outlier_share", "w_std"} <= set(table[0])
  assert (tmp_path / "d" / "layerwise_sqnr.png").stat().st_size > 1000
