"""``python -m qjax.report GRID.yaml --out DIR``: run a grid of recipes on one model and write one comparison report.

``GRID.yaml``::

    model: smollm2-135m                   # any --model value
    flags: [--ppl-datasets, wikitext2, --seqlen, "2048", --eval-nsamples, "4", --tasks, piqa, --limit, "100"]
    decode: {prompt: "Once upon a time", max_new_tokens: 32}     # optional: decode tokens/s of each run
    runs:
      fp: {}
      rtn-w4g64: {flags: [--method, rtn, --wbits, "4", --groupsize, "64"]}
      mixed: {recipe: recipes/mixed.yaml}                        # a recipe file (relative to GRID.yaml)

Each run is ``python -m qjax.quantize --model M FLAGS RUN-FLAGS [--recipe FILE] --json DIR/runs/NAME.json`` (in this
process, through :func:`qjax.cli.quantize.run`, saving the quantized model in ``DIR/runs/NAME.ckpt`` when
``decode`` is set, then ``python -m qjax.generate --load`` of it for the decode speed); a run whose JSON exists is
reused (the report resumes). ``DIR/report.md`` and ``DIR/report.html`` hold one table (method, bits per weight,
bytes, compression, quantize time, perplexities, task accuracies, decode tokens/s), ``DIR/ppl_vs_bits.png`` the
perplexity of the first text against bits per weight with the Pareto front, ``DIR/tasks.png`` per-task bars.
"""
from __future__ import annotations

import contextlib
import html
import io
import json
import shutil
from pathlib import Path

import yaml

from qjax.cli import common as cli
from qjax.cli import generate as generate_cli
from qjax.cli import quantize as quantize_cli
from qjax.core.errors import InputError
from qjax.core.progress import bar as progress_bar
from qjax.io import checkpoint

PROG = "python -m qjax.report"


def load_grid(path) -> dict:
  """The grid file, checked: ``model``, optional ``flags`` (strings), ``decode`` and ``runs`` (name -> ``flags``
  and / or ``recipe``)."""
  path = Path(path)
  try:
    grid = yaml.safe_load(path.read_text())
  except (OSError, yaml.YAMLError) as e:
    raise InputError(f"grid file {path}: {e}") from None
  if not isinstance(grid, dict) or not isinstance(grid.get("runs"), dict) or not grid["runs"]:
    raise InputError(f"grid file {path} needs a 'runs' mapping of run name -> {{flags, recipe}}")
  unknown = set(grid) - {"model", "flags", "decode", "runs"}
  if unknown:
    raise InputError(f"grid file {path}: unknown key {sorted(unknown)[0]!r} (model, flags, decode, runs)")
  for name, run in grid["runs"].items():
    run = run or {}
    if not isinstance(run, dict) or set(run) - {"flags", "recipe"}:
      raise InputError(f"grid file {path}: run {name!r} takes 'flags' (a list) and / or 'recipe' (a file)")
    if "recipe" in run:
      recipe = (path.parent / run["recipe"]).resolve()
      if not recipe.is_file():
        raise InputError(f"grid file {path}: run {name!r}: recipe file {recipe} not found")
      run["recipe"] = str(recipe)
    grid["runs"][name] = {"flags": [str(f) for f in run.get("flags", [])], "recipe": run.get("recipe")}
  grid["flags"] = [str(f) for f in grid.get("flags", [])]
  return grid


def _quiet(fn, argv):
  """``fn(argv)`` with its stdout captured (the report prints its own table)."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    rc = fn(argv)
  if rc:
    raise InputError(f"run failed ({rc}): {' '.join(argv)}")
  return buf.getvalue()


def run_one(grid: dict, name: str, folder: Path) -> dict:
  """One run's JSON (cached in ``folder/runs/NAME.json``)."""
  out = folder / "runs" / f"{name}.json"
  if out.is_file():
    return json.loads(out.read_text())
  out.parent.mkdir(parents=True, exist_ok=True)
  run = grid["runs"][name]
  flags = [*(["--model", grid["model"]] if grid.get("model") else []), *grid["flags"], *run["flags"],
           *(["--recipe", run["recipe"]] if run["recipe"] else []), "--no-progress"]
  ckpt = folder / "runs" / f"{name}.ckpt"
  tmp = out.with_suffix(".json.tmp")
  quantize_args = [*flags, "--json", str(tmp), "--overwrite"]
  if grid.get("decode"):
    shutil.rmtree(ckpt, ignore_errors=True)
    quantize_args += ["--save", str(ckpt)]
  _quiet(quantize_cli.run, quantize_args)
  result = json.loads(tmp.read_text())
  if grid.get("decode"):
    d = grid["decode"]
    gen = folder / "runs" / f"{name}.generate.json"
    _quiet(generate_cli.run, ["--load", str(ckpt), "--prompt", str(d.get("prompt", "Once upon a time")),
                              "--max-new-tokens", str(d.get("max_new_tokens", 32)), "--json", str(gen),
                              "--overwrite"])
    result["decode_tokens_per_second"] = json.loads(gen.read_text())["timing"]["decode_tokens_per_second"]
  with checkpoint.atomic_file(out) as f:
    f.write(json.dumps(result, indent=1))
  tmp.unlink(missing_ok=True)
  return result


def table(results: dict) -> tuple[list[str], list[list]]:
  """The report's header and rows (one per run)."""
  texts = list(dict.fromkeys(t for r in results.values() for t in r.get("ppl", {})))
  tasks = list(dict.fromkeys(t for r in results.values() for t in r.get("tasks", {})))
  header = ["run", "method", "bits / weight", "bytes", "compression", "quantize s",
            *[f"ppl {t}" for t in texts], *[f"{t} acc" for t in tasks], "decode tok/s"]
  rows = []
  for name, r in results.items():
    s, tm = r["size"], r["timing"]
    acc = lambda t: r.get("tasks", {}).get(t, {}).get("acc")
    rows.append([name, r["config"]["method"]["name"], f"{s['bits_per_weight']:.2f}", f"{s['quantized_bytes']:,}",
                 f"{s['compression_ratio']:.2f}x",
                 "-" if tm.get("quantize_seconds") is None else f"{tm['quantize_seconds']:.1f}",
                 *[f"{r['ppl'][t]:.3f}" if t in r.get("ppl", {}) else "-" for t in texts],
                 *[f"{acc(t):.4f}" if acc(t) is not None else "-" for t in tasks],
                 f"{r['decode_tokens_per_second']:.1f}" if r.get("decode_tokens_per_second") else "-"])
  return header, rows


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
  """The points (bits, ppl, name) no other point beats on both (fewer or equal bits and lower ppl), by bits."""
  front, best = [], float("inf")
  for p in sorted(points, key=lambda p: (p[0], p[1])):
    if p[1] < best:
      front.append(p)
      best = p[1]
  return front


def _plots(folder: Path, results: dict) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  written = []
  text = next((t for r in results.values() for t in r.get("ppl", {})), None)
  if text:
    pts = [(r["size"]["bits_per_weight"], r["ppl"][text], n) for n, r in results.items() if text in r.get("ppl", {})]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for b, p, n in pts:
      ax.annotate(n, (b, p), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto(pts)
    ax.plot([p[0] for p in front], [p[1] for p in front], "r--", lw=1, label="Pareto front")
    ax.set_xlabel("bits per quantized weight")
    ax.set_ylabel(f"{text} perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "ppl_vs_bits.png", dpi=100)
    plt.close(fig)
    written.append("ppl_vs_bits.png")
  tasks = list(dict.fromkeys(t for r in results.values() for t in r.get("tasks", {})))
  if tasks:
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(tasks) * len(results) / 3), 4))
    width = 0.8 / len(results)
    for k, (n, r) in enumerate(results.items()):
      ax.bar([i + k * width for i in range(len(tasks))], [r.get("tasks", {}).get(t, {}).get("acc", 0) for t in tasks],
             width, label=n)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "tasks.png", dpi=100)
    plt.close(fig)
    written.append("tasks.png")
  return written


def write_report(folder: Path, grid: dict, results: dict) -> list[str]:
  header, rows = table(results)
  images = _plots(folder, results)
  md = [f"# qjax report: {grid.get('model') or 'default model'}", "", f"common flags: `{' '.join(grid['flags'])}`", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  md += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  md += ["", *[f"![{i}]({i})" for i in images], "", "Every run's JSON: `runs/NAME.json`."]
  (folder / "report.md").write_text("\n".join(md) + "\n")
  cells = lambda r, tag: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in r)
  page = ["<!doctype html><meta charset='utf-8'><title>qjax report</title>",
          f"<h1>qjax report: {html.escape(str(grid.get('model') or 'default model'))}</h1>",
          f"<p>common flags: <code>{html.escape(' '.join(grid['flags']))}</code></p>",
          "<table border='1' cellpadding='4'>", f"<tr>{cells(header, 'th')}</tr>",
          *[f"<tr>{cells(r, 'td')}</tr>" for r in rows], "</table>", *[f"<p><img src='{i}'></p>" for i in images]]
  (folder / "report.html").write_text("\n".join(page) + "\n")
  return ["report.md", "report.html", *images]


def run(argv=None) -> int:
  p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0])
  p.add_argument("grid", help="the grid YAML file")
  p.add_argument("--out", required=True, help="report folder (runs already in it are reused)")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  grid = load_grid(args.grid)
  folder = Path(args.out)
  folder.mkdir(parents=True, exist_ok=True)
  results = {}
  for name in progress_bar(list(grid["runs"]), desc="report runs", enabled=not args.no_progress):
    results[name] = run_one(grid, name, folder)
  files = write_report(folder, grid, results)
  header, rows = table(results)
  print(cli.format_table(header, rows))
  print(f"\nreport: {', '.join(str(folder / f) for f in files)}")
  return 0


def main(argv=None) -> int:
  return cli.run_guarded(run, argv, PROG)
