"""Kernel benchmark on this CPU: ``qmatmul`` implementations against the dense float32 matmul, and cache-free causal
attention in query blocks against one call, each beside its memory-bound ceiling.

qmatmul rows (``--shapes``, default SmolLM2-135M's linears and LLaMA-7B's; ``--ms`` rows of x; ``--formats``):
dense float32 ``dot_general`` vs ``implementation="xla"`` (dequantize + matmul) vs ``"cpu"`` (the native kernel,
when built) on an RTN QArray with float16 scales. ``bytes``: what one call must read (weight + scales / zeros +
x); ``ceiling_vs_dense``: dense bytes / quantized bytes, the speedup a memory-bound kernel could reach. Times are
medians of ``--repeats`` jitted calls after a warm-up.

lut_gemm rows (``--lut-formats``, same shapes and ``--ms``): a BCQ weight (greedy, ``q`` bit planes, float16
alphas, with offsets: the form an RTN -> BCQ conversion has) through ``lut_gemm`` ``"xla"`` (decompress + matmul)
and ``"cpu"`` (the native table-lookup kernel), beside the native ``qmatmul`` on an RTN QArray of the same bits and
groups (``qmatmul_cpu_ms``, the same bytes to read): ``bytes`` = q bits + alphas (+ offsets) per weight + x.

Attention row: SmolLM2's shape (9 query / 3 KV heads,
head_dim 64) at ``--seqlen`` tokens, ``kv_attention.attention`` with ``causal=False`` vs ``True``.

Run on a quiet machine (XLA's CPU pool halves under load; the JSON records the load average):
  JAX_PLATFORMS=cpu python eval/bench_kernels.py
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from qjax.kernels import kv_attention, lut_gemm
from qjax.kernels.qmatmul import cpu, dense_matmul, qmatmul
from qjax.methods.weights import bcq, rtn
from qjax.models.layers import causal_mask

SHAPES = {"smollm2.qo": (576, 576), "smollm2.kv": (192, 576), "smollm2.gate_up": (1536, 576),
          "smollm2.down": (576, 1536), "llama7b.qkvo": (4096, 4096), "llama7b.gate_up": (11008, 4096),
          "llama7b.down": (4096, 11008)}
FORMATS = {"w4g64": dict(bits=4, group_size=64), "w4g128": dict(bits=4, group_size=128),
           "w8pc": dict(bits=8, group_size=-1), "w2g64": dict(bits=2, group_size=64),
           "w3g128": dict(bits=3, group_size=128)}


def median_seconds(f, *args, repeats: int) -> float:
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def qmatmul_row(n: int, k: int, m: int, fmt: dict, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(n, k)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  q = rtn.quantize_weight(w, scale_dtype="float16", **fmt)
  g = q.scale.shape[1]
  qbytes = q.codes.size * 4 + g * n * 2 + (0 if q.zero is None else g * n) + 4 * m * k
  dbytes = 4 * n * k + 4 * m * k
  row = {"bytes_dense": dbytes, "bytes_quantized": qbytes, "ceiling_vs_dense": round(dbytes / qbytes, 2),
         "dense_ms": 1e3 * median_seconds(jax.jit(dense_matmul), x, w, repeats=repeats),
         "xla_ms": 1e3 * median_seconds(jax.jit(lambda x, q: qmatmul(x, q, implementation="xla")), x, q,
                                        repeats=repeats)}
  if cpu.available() and m <= cpu.MAX_M:
    row["cpu_ms"] = 1e3 * median_seconds(jax.jit(lambda x, q: qmatmul(x, q, implementation="cpu", fallback=False)),
                                         x, q, repeats=repeats)
    row["cpu_vs_dense"] = round(row["dense_ms"] / row["cpu_ms"], 2)
  row["xla_vs_dense"] = round(row["dense_ms"] / row["xla_ms"], 3)
  return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def lut_gemm_row(n: int, k: int, m: int, fmt: dict, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(n, k)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  b = bcq.quantize_weight(w, bits=fmt["bits"], group_size=fmt["group_size"], rounds=0, offset=True)
  bbytes = b.planes.size * 4 + b.alpha.size * 2 + b.offset.size * 2 + 4 * m * k
  dbytes = 4 * n * k + 4 * m * k
  call = lambda impl: jax.jit(lambda x, b: lut_gemm.lut_gemm(x, b, implementation=impl, fallback=False))
  row = {"bytes_dense": dbytes, "bytes_bcq": bbytes, "ceiling_vs_dense": round(dbytes / bbytes, 2),
         "dense_ms": 1e3 * median_seconds(jax.jit(dense_matmul), x, w, repeats=repeats),
         "xla_ms": 1e3 * median_seconds(call("xla"), x, b, repeats=repeats)}
  if lut_gemm.cpu.available() and m <= lut_gemm.cpu.MAX_M:
    row["cpu_ms"] = 1e3 * median_seconds(call("cpu"), x, b, repeats=repeats)
    row["cpu_vs_dense"] = round(row["dense_ms"] / row["cpu_ms"], 2)
  if cpu.available() and m <= cpu.MAX_M:
    q = rtn.quantize_weight(w, scale_dtype="float16", **fmt)
    row["qmatmul_cpu_ms"] = 1e3 * median_seconds(
        jax.jit(lambda x, q: qmatmul(x, q, implementation="cpu", fallback=False)), x, q, repeats=repeats)
    if "cpu_ms" in row:
      row["lut_vs_qmatmul"] = round(row["qmatmul_cpu_ms"] / row["cpu_ms"], 2)
  return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def attention_row(t: int, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, t, h, 64)), jnp.float32) for h in (9, 3, 3))
  mask = causal_mask(jnp.ones((1, t), jnp.int32))
  f = lambda causal: jax.jit(lambda q, k, v, m: kv_attention.attention(q, k, v, m, 0.125, causal=causal))
  one, blocks = (1e3 * median_seconds(f(c), q, k, v, mask, repeats=repeats) for c in (False, True))
  return {"seqlen": t, "one_call_ms": round(one, 2), "causal_blocks_ms": round(blocks, 2),
          "speedup": round(one / blocks, 2), "block": kv_attention.xla.CAUSAL_BLOCK}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {','.join(SHAPES)}")
  p.add_argument("--formats", default="w4g64,w8pc", help=f"subset of {','.join(FORMATS)}")
  p.add_argument("--lut-formats", default="w4g64,w3g128", help=f"lut_gemm rows: subset of {','.join(FORMATS)} "
                                                                "('' skips)")
  p.add_argument("--ms", default="1,16", help="rows of x")
  p.add_argument("--seqlen", type=int, default=2048, help="attention row length (0: skip)")
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args(argv)
  out = {"env": {"jax": jax.__version__, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                 "native_cpu_kernel": cpu.available(), "native_avx2": cpu.HAS_AVX2,
                 "native_lut_gemm": lut_gemm.cpu.available()}, "qmatmul": {}}
  for s in args.shapes.split(","):
    for f in args.formats.split(","):
      for m in map(int, args.ms.split(",")):
        out["qmatmul"][f"{s} {f} M={m}"] = qmatmul_row(*SHAPES[s], m, FORMATS[f], args.repeats)
  if args.lut_formats:
    out["lut_gemm"] = {f"{s} bcq-{f} M={m}": lut_gemm_row(*SHAPES[s], m, FORMATS[f], args.repeats)
                       for s in args.shapes.split(",") for f in args.lut_formats.split(",")
                       for m in map(int, args.ms.split(","))}
  if args.seqlen:
    out["causal_attention"] = attention_row(args.seqlen, max(3, args.repeats // 4))
  out["env"]["load_average_end"] = os.getloadavg()
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
