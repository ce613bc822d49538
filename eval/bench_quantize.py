"""GPTQ quantization-time benchmark: qjax (JAX/XLA) versus a faithful torch GPTQ (``eval/torch_gptq.py``), CPU.

1. One linear (``--sizes``, out x in; default 1024x1024, 4096x4096, 11008x4096), 4 bits, block 128, three configs:
   per-channel (``w4``), groups of 128 (``w4g128``) and groups of 128 with act-order (``w4g128_act``). The Hessian
   comes from random correlated inputs ``X = (noise @ (I + G / sqrt(in))) * s`` (log-normal channel scales ``s``,
   so act-order matters), ``N = 2 * in`` rows, ``H = 2 X^T X / N``; weights ``normal(0, 0.02)``; the same ``W, H``
   go to both. qjax: ``qjax.methods.weights.gptq.quantize_weight`` (timed to ``jax.block_until_ready`` of the QArray);
   a cold call before the rounds (not in the ratio) gives ``qjax_first_call_s`` and ``qjax_compile_s`` (the
   tracing, lowering and XLA compile durations JAX reports through ``jax.monitoring`` during that call).
   torch: ``torch_gptq.gptq``. Reported: best steady-state seconds of each, ``ratio = torch / qjax`` (>1: qjax
   faster) and, as a sanity check, ``||X_s (Wq - W)^T||`` of both outputs on 512 of the rows of ``X``, their
   relative difference, the GPTQ losses and the fraction of quantized weights that differ by more than
   ``1e-3 max|W|`` (code flips; float rounding of the scales differs at the ulp level).
2. Whole model (skip with ``--skip-model``): stories260K and ``llama8x512`` (``bench_ppl.make_llama8x512``: 8
   layers, hidden 512, random weights), GPTQ W4 g128 (``--model-groups 128,-1`` adds per-channel; scales kept in
   float32 so both pipelines feed identical weights forward), 128 windows x 256 tokens of TinyStories
   calibration text (``qjax.calibration.sample_windows``, seed 0). qjax: ``gptq.quantize`` (total wall
   time, the report's per-layer seconds and ``peak_host_bytes`` = process ``ru_maxrss``, so it includes what ran
   before). torch: the reference pipeline (``llama_sequential``) written below on the transformers model: capture
   the inputs of layer 0 (Catcher), then per layer run every window (batch 1) with forward hooks accumulating
   ``H = 2/n sum X^T X`` for the 7 linears, ``torch_gptq.gptq`` each, rerun the quantized layer for the next
   inputs. qjax additionally runs the float layer per layer for its report's output error (extra work). The
   first qjax run includes compilation (``qjax_first_s``); ``qjax_s`` is the best of ``--model-repeats`` later
   runs. ``*_rss_peak_delta`` is the peak resident-memory growth during one run (sampled every 10 ms), comparable
   between the two. ``loss_rel_diff`` compares the summed GPTQ losses of all linears (sanity check).
3. Real model (``--real smollm2-135m``; skipped by default): the issue's end-to-end comparison, GPTQ W4 g128
   act-order (non-static groups, as the reference) on ``--real-nsamples x --real-seqlen`` WikiText-2 calibration
   windows (default 128 x 2048, seed 0): qjax once (wall seconds, compile seconds from ``jax.monitoring``, peak
   host memory, per-layer seconds), then the torch pipeline on the transformers model of the same GGUF, each
   followed by the WikiText-2 perplexity of its quantized model (``--real-eval-windows`` windows); ``ratio =
   torch / qjax``. The two perplexities differ by float rounding only (GPTQ is chaotic at ties: compare with the
   reference's own run-to-run spread in the README).

The two frameworks alternate for ``--repeats`` rounds (the order flips each round) and the best round of each is
reported: the CPU is shared and noisy (~2x run to run), so compare the ratios of one run, not numbers across
runs. The load average at start and end is recorded in ``env``: when other processes keep the cores busy, the
many small multi-threaded XLA kernels of GPTQ's column loop stall (measured at load ~3 on 2 cores: 1024x1024 in
0.77 s with 2 threads versus 0.11 s with 1; 4096x4096 2x slower with 2 threads than with 1), so ratios taken
under load understate qjax; ``--threads 1`` gives load-robust ratios. Threads as in
``eval/bench_ppl.py``: ``--threads N`` (default ``os.cpu_count()``) pins the process to N cores before JAX starts
and sets ``torch.set_num_threads(N)``; ``OMP_WAIT_POLICY`` defaults to PASSIVE.

Run (~10 min on 2 cores):
  JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 .venv/bin/python eval/bench_quantize.py
  JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 .venv/bin/python eval/bench_quantize.py --sizes 4096x4096 --skip-model
Prints one JSON object to stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see eval/bench_ppl.py

SIZES = "1024x1024,4096x4096,11008x4096"
CONFIGS = {"w4": dict(group_size=-1, act_order=False), "w4g128": dict(group_size=128, act_order=False),
           "w4g128_act": dict(group_size=128, act_order=True)}
NSAMPLES, SEQLEN = 128, 256
ERR_ROWS = 512

def log(*a):
  print(*a, file=sys.stderr, flush=True)


class PeakRSS:
  """Peak resident-set growth (bytes) while the ``with`` body runs, sampled every 10 ms from /proc/self/statm."""

  def __enter__(self):
    self.page = os.sysconf("SC_PAGE_SIZE")
    self.base = self.peak = self._rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _rss(self):
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * self.page

  def _run(self):
    while not self._stop.wait(0.01):
      self.peak = max(self.peak, self._rss())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._rss())
    self.delta = self.peak - self.base


# ----------------------------------------------------------------------------------------------- one linear

@functools.cache
def make_inputs(inp, seed=0):
  """``(H [in, in], X_s [ERR_ROWS, in])`` float32 from correlated random inputs (see the docstring)."""
  import torch
  rng = np.random.default_rng(seed)
  n = 2 * inp
  mix = np.eye(inp, dtype=np.float32) + rng.standard_normal((inp, inp), np.float32) / np.float32(np.sqrt(inp))
  s = torch.from_numpy(np.exp(0.75 * rng.standard_normal(inp)).astype(np.float32))
  x = (torch.from_numpy(rng.standard_normal((n, inp), np.float32)) @ torch.from_numpy(mix)) * s
  return ((x.T @ x) * (2.0 / n)).numpy(), x[:ERR_ROWS].numpy().copy()


def make_problem(out, inp, seed=0):
  """``(W [out, in], H [in, in], X_s [ERR_ROWS, in])``, weights ``normal(0, 0.02)``."""
  return (0.02 * np.random.default_rng(seed + 1).standard_normal((out, inp), np.float32), *make_inputs(inp, seed))


def bench_linear(sizes, repeats):
  import jax
  import jax.numpy as jnp
  import torch
  from torch_gptq import gptq as torch_gptq

  from qjax.core import timing
  from qjax.methods.weights import gptq as qgptq

  results, problems = {}, {}
  for out, inp in sizes:
    name = f"{out}x{inp}"
    t0 = time.perf_counter()
    w, h, xs = make_problem(out, inp)
    wj, hj = jnp.asarray(w), jnp.asarray(h)
    problems[name] = (w, xs, wj, hj, torch.from_numpy(w), torch.from_numpy(h))
    log(f"[{name}] problem built in {time.perf_counter() - t0:.1f}s")
    for cname, cfg in CONFIGS.items():  # cold call: tracing + compilation + one run
      t0 = time.perf_counter()
      with timing.compile_time() as compiled:
        jax.block_until_ready(qgptq.quantize_weight(wj, hj, bits=4, block_size=128, **cfg).qarray)
      results.setdefault(name, {})[cname] = {"qjax_first_call_s": round(time.perf_counter() - t0, 3),
                                             "qjax_compile_s": round(compiled.seconds, 3),
                                             "qjax_rounds_s": [], "torch_rounds_s": []}
      log(f"[{name} {cname}] qjax first call {time.perf_counter() - t0:.2f}s (compilation {compiled.seconds:.2f}s)")

  for rnd in range(repeats):
    for name, (w, xs, wj, hj, wt, ht) in problems.items():
      for cname, cfg in CONFIGS.items():
        r = results[name][cname]

        def run_qjax():
          t = time.perf_counter()
          res = qgptq.quantize_weight(wj, hj, bits=4, block_size=128, **cfg)
          jax.block_until_ready(res.qarray)
          r["qjax_rounds_s"].append(round(time.perf_counter() - t, 3))
          return res

        def run_torch():
          t = time.perf_counter()
          out = torch_gptq(wt, ht, bits=4, block_size=128, **cfg)
          r["torch_rounds_s"].append(round(time.perf_counter() - t, 3))
          return out

        if rnd % 2 == 0:
          qres, (tq, tloss) = run_qjax(), run_torch()
        else:
          (tq, tloss), qres = run_torch(), run_qjax()
        log(f"[{name} {cname}] round {rnd}: qjax {r['qjax_rounds_s'][-1]:.3f}s  torch {r['torch_rounds_s'][-1]:.3f}s")
        if rnd == 0:
          wq_j = np.asarray(qres.qarray.dequantize(), np.float32)
          wq_t = tq.numpy()
          ej, et = (float(np.linalg.norm(xs @ (wq - w).T)) for wq in (wq_j, wq_t))
          r.update(err_qjax=ej, err_torch=et,
                   err_rel_diff=abs(ej - et) / et, loss_qjax=float(qres.losses.sum()), loss_torch=tloss,
                   weights_differ_frac=float(np.mean(np.abs(wq_j - wq_t) > 1e-3 * np.abs(w).max())))
  for name in results:
    for r in results[name].values():
      r["qjax_s"], r["torch_s"] = min(r["qjax_rounds_s"]), min(r["torch_rounds_s"])
      r["ratio"] = round(r["torch_s"] / r["qjax_s"], 3)
  return results


# ----------------------------------------------------------------------------------------------- whole model

def torch_gptq_model(path, windows, group_size):
  """The reference layer-wise GPTQ (``torch_gptq.gptq_model``: ``llama_sequential``, all 7 linears at once) on the
  transformers model. Returns ``(seconds, per-layer seconds, total GPTQ loss)``; the model load is not timed."""
  import torch
  from torch_gptq import gptq_model
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
  start = time.perf_counter()
  rep = gptq_model(model, windows, bits=4, group_size=group_size)
  loss = sum(sum(l.values()) for l in rep["layers"])
  return time.perf_counter() - start, rep["seconds"], loss


def bench_model(name, path, windows, repeats, groups):
  from qjax import calibration
  from qjax.io.hf import load_model
  from qjax.methods.weights import gptq as qgptq
  model, params = load_model(path)
  res = {}
  for g in groups:
    gname = f"g{g}" if g > 0 else "perchannel"
    cfg = qgptq.GPTQConfig(bits=4, group_size=g, act_order=False, scale_dtype="float32")
    calib = calibration.Calibration(model, windows)
    r = {"qjax_rounds_s": [], "torch_rounds_s": []}

    def run_qjax():
      with PeakRSS() as m:
        t = time.perf_counter()
        _, rep = qgptq.quantize(params, cfg, calibration=calib, progress=False)
        r["qjax_rounds_s"].append(round(time.perf_counter() - t, 3))
      r["qjax_rss_peak_delta_bytes"] = max(r.get("qjax_rss_peak_delta_bytes", 0), m.delta)
      if len(r["qjax_rounds_s"]) == 1 or r["qjax_rounds_s"][-1] <= min(r["qjax_rounds_s"]):
        r["qjax_layer_s"] = [round(l.seconds, 3) for l in rep.layers]
      r.update(qjax_peak_host_bytes=rep.peak_host_bytes, qjax_activation_bytes=rep.activation_bytes,
               qjax_loss=sum(sum(l.linear_losses.values()) for l in rep.layers),
               qjax_output_rel_error=[round(l.output_rel_error, 6) for l in rep.layers])

    def run_torch():
      with PeakRSS() as m:
        secs, per_layer, loss = torch_gptq_model(path, windows, g)
      r["torch_rounds_s"].append(round(secs, 3))
      r["torch_rss_peak_delta_bytes"] = max(r.get("torch_rss_peak_delta_bytes", 0), m.delta)
      if secs <= min(r["torch_rounds_s"]):
        r["torch_layer_s"] = [round(s, 3) for s in per_layer]
      r["torch_loss"] = loss

    run_qjax()  # cold: includes compilation
    r["qjax_first_s"] = r["qjax_rounds_s"].pop()
    log(f"[{name} {gname}] qjax cold (with compilation) {r['qjax_first_s']:.2f}s")
    for rnd in range(repeats):
      for f in ((run_torch, run_qjax) if rnd % 2 else (run_qjax, run_torch)):
        f()
      log(f"[{name} {gname}] round {rnd}: qjax {r['qjax_rounds_s'][-1]:.2f}s  torch {r['torch_rounds_s'][-1]:.2f}s")
    r["qjax_s"], r["torch_s"] = min(r["qjax_rounds_s"]), min(r["torch_rounds_s"])
    r["ratio"] = round(r["torch_s"] / r["qjax_s"], 3)
    r["loss_rel_diff"] = abs(r["qjax_loss"] - r["torch_loss"]) / abs(r["torch_loss"])
    res[gname] = dict(sorted(r.items()))
  return res


def bench_real(name, nsamples, seqlen, eval_windows):
  """The real-model benchmark: ``name`` (e.g. ``smollm2-135m``, a GGUF) quantized with GPTQ W4 g128 act-order
  (reference semantics: non-static groups; the same config both sides) on ``nsamples x seqlen`` WikiText-2
  calibration windows (seed 0), qjax (``gptq.quantize``, once: compilation reported separately) then the torch
  pipeline (``torch_gptq.gptq_model`` on the transformers model loaded from the same file), each followed by its
  own WikiText-2 perplexity (first ``eval_windows`` windows of ``seqlen``) of the quantized model."""
  import torch
  from bench_ppl import torch_causal_lm
  from torch_gptq import gptq_model
  from torch_gptq import perplexity as torch_perplexity

  import qjax
  from qjax import calibration
  from qjax.core.timing import compile_time
  from qjax.evaluation import perplexity as ppl
  from qjax.io import assets
  from qjax.io import text as data
  from qjax.methods.weights import gptq as qgptq
  loaded = qjax.load(name)
  model, params = loaded.model, loaded.params
  calib = data.tokenize(loaded.tokenizer, data.read_text(assets.named_text("wikitext2", assets.CALIB_DATASETS)))
  windows = calibration.sample_windows(calib, nsamples, seqlen)
  test = data.tokenize(loaded.tokenizer, data.read_text(assets.named_text("wikitext2", assets.PPL_DATASETS)))
  cfg = qgptq.GPTQConfig(bits=4, group_size=128, act_order=True, static_groups=False, scale_dtype="float32")
  r = {"windows": nsamples, "seqlen": seqlen, "eval_windows": eval_windows,
       "config": "W4 g128 act-order (non-static groups), float32 scales"}
  with PeakRSS() as m, compile_time() as c:
    t = time.perf_counter()
    qparams, rep = qgptq.quantize(params, cfg, calibration=calibration.Calibration(model, windows), progress=False)
    r["qjax_s"] = round(time.perf_counter() - t, 3)
  r.update(qjax_compile_s=round(c.seconds, 3), qjax_rss_peak_delta_bytes=m.delta,
           qjax_peak_host_bytes=rep.peak_host_bytes, qjax_layer_s=[round(l.seconds, 3) for l in rep.layers],
           qjax_loss=sum(sum(l.linear_losses.values()) for l in rep.layers))
  r["qjax_ppl"] = ppl.perplexity(model, qparams, test, seqlen, eval_windows, progress=False).ppl
  r["fp_ppl"] = ppl.perplexity(model, params, test, seqlen, eval_windows, progress=False).ppl
  log(f"[{name}] qjax {r['qjax_s']:.1f}s (compile {r['qjax_compile_s']:.1f}s) ppl {r['qjax_ppl']:.4f}")
  del qparams
  tm = torch_causal_lm(str(assets.model_path(name)))
  with PeakRSS() as m:
    t = time.perf_counter()
    trep = gptq_model(tm, windows, bits=4, group_size=128, act_order=True)
    r["torch_s"] = round(time.perf_counter() - t, 3)
  r.update(torch_rss_peak_delta_bytes=m.delta, torch_layer_s=[round(x, 3) for x in trep["seconds"]],
           torch_loss=sum(sum(l.values()) for l in trep["layers"]))
  with torch.no_grad():
    r["torch_ppl"] = torch_perplexity(tm, test, seqlen, eval_windows)
  log(f"[{name}] torch {r['torch_s']:.1f}s ppl {r['torch_ppl']:.4f}")
  r["ratio"] = round(r["torch_s"] / r["qjax_s"], 3)
  r["loss_rel_diff"] = abs(r["qjax_loss"] - r["torch_loss"]) / abs(r["torch_loss"])
  r["ppl_rel_diff"] = abs(r["qjax_ppl"] - r["torch_ppl"]) / r["torch_ppl"]
  return r


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default=SIZES, help="comma-separated OUTxIN linear shapes ('' to skip)")
  p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each is reported")
  p.add_argument("--skip-model", action="store_true", help="skip the whole-model benchmark")
  p.add_argument("--model-repeats", type=int, default=1, help="alternating whole-model rounds after the cold run")
  p.add_argument("--model-groups", default="128", help="comma-separated group sizes for the whole model (-1: "
                 "per-channel)")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both frameworks (default: all)")
  p.add_argument("--real", default="", help="real models for the GPTQ W4 g128 act-order pipeline benchmark, e.g. "
                 "smollm2-135m ('' to skip)")
  p.add_argument("--real-nsamples", type=int, default=128, help="calibration windows of the real-model benchmark")
  p.add_argument("--real-seqlen", type=int, default=2048, help="calibration / evaluation window length there")
  p.add_argument("--real-eval-windows", type=int, default=40, help="WikiText-2 windows for its perplexities")
  args = p.parse_args(argv)
  sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",") if s]
  cpus = sorted(os.sched_getaffinity(0))
  if args.threads < len(cpus):
    os.sched_setaffinity(0, cpus[:args.threads])  # before JAX creates its CPU client

  import jax
  import torch
  import transformers
  transformers.utils.logging.disable_progress_bar()
  torch.set_num_threads(args.threads)
  env = {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
         "python": platform.python_version(), "cpu_count": os.cpu_count(),
         "affinity_cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
         "jax_backend": jax.default_backend(), "repeats": args.repeats, "model_repeats": args.model_repeats,
         "load_avg_start": os.getloadavg(),
         **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "XLA_FLAGS")}}
  out = {"env": env, "linear": bench_linear(sizes, args.repeats) if sizes else {}}
  if args.skip_model:
    out["models"] = "skipped (--skip-model)"
  else:
    from bench_ppl import make_llama8x512

    from qjax.calibration import sample_windows
    from qjax.io import assets
    from qjax.io import text as data
    story = assets.asset(assets.DEFAULT_MODEL)
    text = data.read_text(assets.named_text("tinystories", assets.CALIB_DATASETS))
    windows = sample_windows(data.tokenize(data.load_tokenizer(story), text), NSAMPLES, SEQLEN)
    out["models"] = {}
    groups = [int(g) for g in args.model_groups.split(",") if g]
    with tempfile.TemporaryDirectory() as tmp:
      for name in ("stories260K", "llama8x512"):
        path = story
        if name == "llama8x512":
          path = os.path.join(tmp, name)
          make_llama8x512(path)
        res = bench_model(name, path, windows, args.model_repeats, groups)
        out["models"][name] = {"windows": NSAMPLES, "seqlen": SEQLEN, **res}
  out["real"] = {n: bench_real(n, args.real_nsamples, args.real_seqlen, args.real_eval_windows)
                 for n in args.real.split(",") if n}
  env["load_avg_end"] = os.getloadavg()
  env["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
