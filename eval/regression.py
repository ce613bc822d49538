"""The README's recipes, re-run through ``python -m qjax.quantize``: their perplexities beside the README's
figures, and (``--compare FILE``) beside an earlier run of this script, so a refactoring can show that every
number is unchanged (same seed: identical to 1e-6 relative). Prints JSON (``--markdown``: also a table on stderr);
``--out FILE`` saves it.

    python eval/regression.py --out before.json          # before a change
    python eval/regression.py --compare before.json      # after it: max relative difference per recipe
    python eval/regression.py --suite smollm2 --only rtn_w4_g64,gptq_w4_g64 --markdown
    python eval/regression.py --merge a.json b.json --out all.json --markdown   # rows of several runs in one

Suites (``--suite``):
  stories   stories260K; TinyStories eval text, seqlen 256, all 631 windows; calibration 128 windows of 256
            tokens of the TinyStories calib text (seed 0).
  smollm2   SmolLM2-135M-Instruct (GGUF); WikiText-2 at seqlen 2048, first 40 windows, and TinyStories at 512,
            first 40 windows; calibration 128 windows of 2048 tokens of the WikiText-2 validation text (seed 0).
            Its weights already lie on a Q4_1 grid (4-bit asymmetric groups of 32), so W4 g32 is no benchmark
            point: groups of 64 and 128 and per channel are.
  stories-bcq, smollm2-bcq   LUT-GEMM's BCQ (greedy, refined, alternating 5 / 30 rounds) at W4 and W3 beside RTN
            and GPTQ at the same bits and groups (stories260K: per channel and g32; SmolLM2: per channel, g64, g128;
            WikiText-2 only), same protocols.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALIB = ["--nsamples", "128", "--calib-seqlen", "256"]
# name -> (flags, the README's figure)
STORIES = {
    "fp32": ([], 6.121),
    "rtn_w4_g32": (["--method", "rtn", "--wbits", "4", "--groupsize", "32"], 6.983),
    "rtn_w3_g32": (["--method", "rtn", "--wbits", "3", "--groupsize", "32"], 12.11),
    "gptq_w4_g32": (["--method", "gptq", "--wbits", "4", "--groupsize", "32", "--act-order", "--static-groups",
                     *CALIB], 6.656),
    "gptq_w3_pc": (["--method", "gptq", "--wbits", "3", "--act-order", *CALIB], 11.36),
    "spqr_w3_g32": (["--method", "spqr", "--wbits", "3", "--groupsize", "32", "--qq-groupsize", "4",
                     "--outlier-threshold", "0.5", "--act-order", "--true-sequential", *CALIB], 8.451),
    "spqr_w3_g32_tau025": (["--method", "spqr", "--wbits", "3", "--groupsize", "32", "--qq-groupsize", "4",
                            "--outlier-threshold", "0.25", "--act-order", "--true-sequential", *CALIB], 7.998),
    "gptq_w3_g32_true_sequential": (["--method", "gptq", "--wbits", "3", "--groupsize", "32", "--act-order",
                                     "--static-groups", "--true-sequential", *CALIB], 8.784),
    "awq_w4_g32": (["--method", "awq", "--wbits", "4", "--groupsize", "32", *CALIB], 6.808),
    "smoothquant_w8a8_int8": (["--smoothquant", "--method", "rtn", "--wbits", "8", "--abits", "8", "--int8-kernel",
                               *CALIB], 6.130),
    "zeroquant_w4_8a8": (["--method", "zeroquant", "--wbits", "4", "--zq-attn-bits", "8", "--abits", "8"], 6.767),
    "zeroquant_w4_8a8_lkd": (["--method", "zeroquant", "--wbits", "4", "--zq-attn-bits", "8", "--abits", "8",
                              "--zq-lkd", *CALIB], 6.470),
    "llm_int8": (["--method", "llm_int8"], 6.122),
    "kivi_2": (["--kv-method", "kivi", "--kv-bits", "2", "--kv-group-size", "8", "--kv-residual", "32"], 6.202),
    "kvquant_4": (["--kv-method", "kvquant", "--kv-bits", "4"], 6.168),
}


def _smollm2() -> dict:
  calib = ["--calib-dataset", "wikitext2", "--nsamples", "128", "--calib-seqlen", "2048"]
  out = {"fp32": ([], None)}
  for g, gname in ((-1, "pc"), (64, "g64"), (128, "g128")):
    out[f"rtn_w4_{gname}"] = (["--method", "rtn", "--wbits", "4", "--groupsize", str(g)], None)
    out[f"gptq_w4_{gname}"] = (["--method", "gptq", "--wbits", "4", "--groupsize", str(g), *calib], None)
  for b in (3, 2):
    out[f"rtn_w{b}_g64"] = (["--method", "rtn", "--wbits", str(b), "--groupsize", "64"], None)
    out[f"gptq_w{b}_g64"] = (["--method", "gptq", "--wbits", str(b), "--groupsize", "64", *calib], None)
  for b in (4, 3):
    out[f"awq_w{b}_g64"] = (["--method", "awq", "--wbits", str(b), "--groupsize", "64", *calib], None)
  out["spqr_w3_g32_qq3"] = (["--method", "spqr", "--wbits", "3", "--groupsize", "32", "--qq-groupsize", "16",
                             "--outlier-threshold", "0.2", *calib], None)
  out["rtn_w8a8"] = (["--method", "rtn", "--wbits", "8", "--abits", "8"], None)
  out["rtn_w8a8_int8"] = (["--method", "rtn", "--wbits", "8", "--abits", "8", "--int8-kernel"], None)
  out["smoothquant_w8a8"] = (["--smoothquant", "--method", "rtn", "--wbits", "8", "--abits", "8", *calib], None)
  out["smoothquant_w8a8_int8"] = ([*out["smoothquant_w8a8"][0], "--int8-kernel"], None)
  out["llm_int8"] = (["--method", "llm_int8"], None)
  zq = ["--method", "zeroquant", "--wbits", "4", "--zq-attn-bits", "8", "--abits", "8"]
  out["zeroquant_w4_8a8"] = (zq, None)
  out["zeroquant_w4_8a8_lkd"] = ([*zq, "--zq-lkd", *calib], None)
  for b in (2, 4):
    out[f"kivi_{b}"] = (["--kv-method", "kivi", "--kv-bits", str(b), "--kv-group-size", "32", "--kv-residual",
                         "128"], None)
  for b in (2, 3, 4):
    out[f"kvquant_{b}"] = (["--kv-method", "kvquant", "--kv-bits", str(b), "--kv-fisher", "--calib-dataset",
                            "wikitext2"], None)
  return out


def _bcq(groups: dict, calib: list) -> dict:
  """LUT-GEMM's BCQ (greedy, refined greedy, alternating 5 and 30 rounds) at W4 and W3 for each group size,
  beside RTN and GPTQ (act-order, static groups) at the same bits and groups (issue 13's results)."""
  searches = {"greedy": ["--bcq-rounds", "0"], "refined": ["--bcq-search", "refined"],
              "alt5": ["--bcq-rounds", "5"], "alt30": ["--bcq-rounds", "30"]}
  out = {}
  for b in (4, 3):
    for gname, g in groups.items():
      grid = ["--wbits", str(b), "--groupsize", str(g)]
      for sname, flags in searches.items():
        out[f"bcq_w{b}_{gname}_{sname}"] = (["--method", "bcq", *grid, *flags], None)
      out[f"rtn_w{b}_{gname}"] = (["--method", "rtn", *grid], None)
      out[f"gptq_w{b}_{gname}"] = (["--method", "gptq", *grid, *calib], None)
  return out


@dataclasses.dataclass(frozen=True)
class Suite:
  common: list            # flags of every run
  recipes: dict           # name -> (flags, README figure or None)
  dataset: str            # whose perplexity is reported and compared
  protocol: str
  first: tuple = ()           # evaluation flags of the main run
  second: tuple = ()          # evaluation flags of a second run of the same recipe (dataset "tinystories")


SUITES = {
    "stories": Suite(["--seqlen", "256", "--no-progress"], STORIES, "tinystories",
                     "stories260K, TinyStories eval, seqlen 256, all windows; calibration 128 x 256 tokens of the "
                     "TinyStories calib text, seed 0"),
    "smollm2": Suite(["--model", "smollm2-135m", "--no-progress"], _smollm2(), "wikitext2",
                     "SmolLM2-135M-Instruct (GGUF), WikiText-2 seqlen 2048 first 40 windows; TinyStories seqlen 512 "
                     "first 40 windows; calibration 128 x 2048 tokens of the WikiText-2 validation text, seed 0",
                     ("--ppl-datasets", "wikitext2", "--seqlen", "2048", "--eval-nsamples", "40"),
                     ("--ppl-datasets", "tinystories", "--seqlen", "512", "--eval-nsamples", "40")),
    "stories-bcq": Suite(["--seqlen", "256", "--no-progress"], {"fp32": ([], 6.121), **_bcq({"pc": -1, "g32": 32},
                                                                                            CALIB)},
                         "tinystories", "stories260K, TinyStories eval, seqlen 256, all windows; GPTQ calibration "
                         "128 x 256 tokens of the TinyStories calib text, seed 0"),
    "smollm2-bcq": Suite(["--model", "smollm2-135m", "--no-progress"],
                         {"fp32": ([], None), **_bcq({"pc": -1, "g64": 64, "g128": 128},
                                                     ["--calib-dataset", "wikitext2", "--nsamples", "128",
                                                      "--calib-seqlen", "2048"])},
                         "wikitext2", "SmolLM2-135M-Instruct (GGUF), WikiText-2 seqlen 2048 first 40 windows; GPTQ "
                         "calibration 128 x 2048 tokens of the WikiText-2 validation text, seed 0",
                         ("--ppl-datasets", "wikitext2", "--seqlen", "2048", "--eval-nsamples", "40")),
}
RECIPES = STORIES  # the default suite


def _quantize_cli(flags: list, json_path: Path) -> tuple[dict | None, str]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
  p = subprocess.run([sys.executable, "-m", "qjax.quantize", *map(str, flags), "--json", str(json_path)], cwd=REPO,
                     env=env, capture_output=True, text=True)
  if p.returncode != 0:
    return None, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
  return json.loads(json_path.read_text()), ""


def run(name: str, suite: Suite, folder: Path) -> dict:
  """One recipe: quantize and evaluate (``suite.first``); with ``suite.second``, the saved result evaluated again
  (``--load``) on TinyStories with those flags."""
  flags = [*suite.common, *suite.recipes[name][0], *suite.first]
  ckpt = folder / f"{name}-ckpt"
  res, err = _quantize_cli([*flags, *(["--save", ckpt] if suite.second else [])], folder / f"{name}.json")
  if res is None:
    return {"error": err}
  row = {"ppl": res["ppl"][suite.dataset], "bits_per_weight": res["size"]["bits_per_weight"],
         "quantize_seconds": res["timing"]["quantize_seconds"]}
  if "kv_cache" in res:
    row["kv_effective_bits"] = res["kv_cache"]["effective_bits"]
  if "calibration" in res:
    row["peak_host_bytes"] = res["calibration"]["peak_host_bytes"]
  if "spqr" in res["size"]:
    row["spqr_bits"] = res["size"]["spqr"]
  if suite.second:
    again, err = _quantize_cli(["--load", ckpt, "--no-progress", *suite.second], folder / f"{name}-2.json")
    row["ppl_tinystories_512"] = again["ppl"]["tinystories"] if again else f"error: {err}"
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--suite", default="stories", choices=sorted(SUITES))
  p.add_argument("--only", help="comma-separated recipe names (default: all)")
  p.add_argument("--out", help="write the JSON here")
  p.add_argument("--compare", help="an earlier --out file: report the relative difference of every perplexity")
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--markdown", action="store_true", help="also print a Markdown table to stderr")
  p.add_argument("--merge", nargs="+", metavar="FILE", help="combine earlier --out files of one suite (no run)")
  args = p.parse_args(argv)
  if args.merge:
    return _merge(args)
  suite = SUITES[args.suite]
  names = args.only.split(",") if args.only else list(suite.recipes)
  if unknown := sorted(set(names) - set(suite.recipes)):
    p.error(f"unknown recipe(s) {unknown}; known: {', '.join(suite.recipes)}")
  with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    futures = {n: pool.submit(run, n, suite, Path(tmp)) for n in names}
    rows = {n: {**f.result(), "readme": suite.recipes[n][1]} for n, f in futures.items()}
  before = json.loads(Path(args.compare).read_text())["recipes"] if args.compare else {}
  for n, r in rows.items():
    if "ppl" in r:
      if r["readme"] is not None:
        r["readme_rounded_match"] = f"{r['ppl']:.4g}" == f"{r['readme']:.4g}"
      if n in before and "ppl" in before[n]:
        r["rel_diff_vs_compare"] = abs(r["ppl"] / before[n]["ppl"] - 1)
  out = {"suite": args.suite, "protocol": suite.protocol, "recipes": rows}
  if args.compare:
    diffs = [r["rel_diff_vs_compare"] for r in rows.values() if "rel_diff_vs_compare" in r]
    out["max_rel_diff_vs_compare"] = max(diffs) if diffs else None
  _emit(out, rows, suite, args)


def _merge(args):
  runs = [json.loads(Path(f).read_text()) for f in args.merge]
  if len({r["suite"] for r in runs}) != 1:
    sys.exit(f"--merge: the files come from different suites ({sorted({r['suite'] for r in runs})})")
  suite = SUITES[runs[0]["suite"]]
  rows = {n: r for run in runs for n, r in run["recipes"].items()}
  rows = {n: rows[n] for n in [*suite.recipes, *sorted(set(rows) - set(suite.recipes))] if n in rows}
  _emit({"suite": runs[0]["suite"], "protocol": runs[0]["protocol"], "recipes": rows}, rows, suite, args)


def _emit(out: dict, rows: dict, suite, args):
  text = json.dumps(out, indent=1)
  print(text)
  if args.markdown:
    print(markdown(rows, suite.dataset), file=sys.stderr)
  if args.out:
    Path(args.out).write_text(text + "\n")


def markdown(rows: dict, dataset: str) -> str:
  lines = [f"| recipe | bits / weight | {dataset} ppl | TinyStories@512 ppl | quantize s |", "|---|---|---|---|---|"]
  for n, r in rows.items():
    if "error" in r:
      lines.append(f"| {n} | error: {r['error']} | | | |")
      continue
    bits = f"{r['bits_per_weight']:.2f}" + (f" (KV {r['kv_effective_bits']:.2f})" if "kv_effective_bits" in r else "")
    ts = r.get("ppl_tinystories_512")
    lines.append(f"| {n} | {bits} | {r['ppl']:.3f} | {f'{ts:.3f}' if isinstance(ts, float) else ts or ''} | "
                 f"{r['quantize_seconds'] or 0:.1f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
