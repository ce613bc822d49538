"""``python -m qjax.report``: a grid of two runs on stories260K (one a recipe file), its table, plots and resumption;
a bad grid file is a one-line error with exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qjax.cli import report

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_pareto_front():
  pts = [(16, 6.1, "fp"), (4.9, 6.6, "a"), (4.9, 7.0, "b"), (3.9, 9.0, "c"), (4.5, 9.5, "d")]
  assert [p[2] for p in report.pareto(pts)] == ["c", "a", "fp"]


def test_table_columns():
  """Perplexities, task accuracies and decode speed of every run, '-' where a run lacks one."""
  base = {"size": {"bits_per_weight": 4.88, "quantized_bytes": 1000, "compression_ratio": 2.5},
          "timing": {"quantize_seconds": 1.5}, "config": {"method": {"name": "rtn"}}, "ppl": {"wikitext2": 21.0}}
  results = {"a": {**base, "tasks": {"piqa": {"acc": 0.61}}, "decode_tokens_per_second": 75.0},
             "b": {**base, "timing": {"quantize_seconds": None}}}
  header, rows = report.table(results)
  assert header[-3:] == ["ppl wikitext2", "piqa acc", "decode tok/s"]
  assert rows[0][-3:] == ["21.000", "0.6100", "75.0"] and rows[1][-2:] == ["-", "-"] and rows[1][5] == "-"


def test_grid_report_and_resume(tmp_path):
  recipe = tmp_path / "bcq.yaml"
  recipe.write_text("type: qjax.Recipe\nversion: 1\nweights:\n- pattern: model/layers_.*/weight\n  method: bcq\n"
                    "  config: {bits: 3, group_size: 32, rounds: 2}\n")
  grid = tmp_path / "grid.yaml"
  grid.write_text("model: stories260k\nflags: [--seqlen, '128', --eval-nsamples, '2']\n"
                  "runs:\n  rtn: {flags: [--method, rtn, --wbits, '4', --groupsize, '32']}\n  bcq: {recipe: bcq.yaml}\n")
  run = lambda *a: subprocess.run([sys.executable, "-m", "qjax.report", *map(str, a)], cwd=REPO, env=ENV,
                                  capture_output=True, text=True, timeout=600)
  p = run(grid, "--out", tmp_path / "rep", "--no-progress")
  assert p.returncode == 0, p.stderr
  out = tmp_path / "rep"
  md = (out / "report.md").read_text()
  assert "| rtn | rtn |" in md and "| bcq | bcq |" in md and "ppl tinystories" in md
  assert (out / "ppl_vs_bits.png").stat().st_size > 1000
  assert "<table" in (out / "report.html").read_text()
  runs = {n: json.loads((out / "runs" / f"{n}.json").read_text()) for n in ("rtn", "bcq")}
  assert runs["bcq"]["config"]["method"]["name"] == "bcq" and runs["bcq"]["size"]["bits_per_weight"] < 5
  stamp = (out / "runs" / "rtn.json").stat().st_mtime_ns
  again = run(grid, "--out", out, "--no-progress")
  assert again.returncode == 0 and (out / "runs" / "rtn.json").stat().st_mtime_ns == stamp   # reused
  (tmp_path / "bad.yaml").write_text("model: stories260k\nruns: {x: {flag: []}}\n")
  bad = run(tmp_path / "bad.yaml", "--out", tmp_path / "nothing")
  assert bad.returncode == 2 and "run 'x'" in bad.stderr and bad.stderr.strip().count("\n") == 0
  assert not (tmp_path / "nothing").exists()
