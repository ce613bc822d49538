"""The README's stories260K recipes, re-run through ``python -m qjax.quantize``: their perplexities beside the
README's figures, and (``--compare FILE``) beside an earlier run of this script, so a refactoring can show that
every number is unchanged (same seed: identical to 1e-6 relative). Prints JSON; ``--out FILE`` saves it.

    python eval/regression.py --out before.json          # before a change
    python eval/regression.py --compare before.json      # after it: max relative difference per recipe

Protocol of every row: TinyStories eval text, seqlen 256, all 631 windows; calibration 128 windows of 256 tokens
of the TinyStories calib text (seed 0).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--seqlen", "256", "--no-progress"]
CALIB = ["--nsamples", "128", "--calib-seqlen", "256"]
# name -> (flags, the README's figure)
RECIPES = {
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


def run(name: str, flags: list[str], folder: Path) -> dict:
  out = folder / f"{name}.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
  p = subprocess.run([sys.executable, "-m", "qjax.quantize", *COMMON, *flags, "--json", str(out)], cwd=REPO,
                     env=env, capture_output=True, text=True)
  if p.returncode != 0:
    return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
  res = json.loads(out.read_text())
  return {"ppl": res["ppl"]["tinystories"], "bits_per_weight": res["size"]["bits_per_weight"],
          "quantize_seconds": res["timing"]["quantize_seconds"]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", help="comma-separated recipe names (default: all)")
  p.add_argument("--out", help="write the JSON here")
  p.add_argument("--compare", help="an earlier --out file: report the relative difference of every perplexity")
  p.add_argument("--workers", type=int, default=2)
  args = p.parse_args(argv)
  names = args.only.split(",") if args.only else list(RECIPES)
  with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    futures = {n: pool.submit(run, n, RECIPES[n][0], Path(tmp)) for n in names}
    rows = {n: {**f.result(), "readme": RECIPES[n][1]} for n, f in futures.items()}
  before = json.loads(Path(args.compare).read_text())["recipes"] if args.compare else {}
  for n, r in rows.items():
    if "ppl" in r:
      r["readme_rounded_match"] = f"{r['ppl']:.4g}" == f"{r['readme']:.4g}"
      if n in before and "ppl" in before[n]:
        r["rel_diff_vs_compare"] = abs(r["ppl"] / before[n]["ppl"] - 1)
  out = {"protocol": "stories260K, TinyStories eval, seqlen 256, all windows; calibration 128 x 256 tokens of the "
                     "TinyStories calib text, seed 0", "recipes": rows}
  if args.compare:
    diffs = [r["rel_diff_vs_compare"] for r in rows.values() if "rel_diff_vs_compare" in r]
    out["max_rel_diff_vs_compare"] = max(diffs) if diffs else None
  text = json.dumps(out, indent=1)
  print(text)
  if args.out:
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
  main()
