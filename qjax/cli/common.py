"""Shared command-line plumbing: one-line errors with exit status 2, model loading from ``--model``/``--load``,
the quantization flags, summary tables and atomic JSON output."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax

from qjax import models
from qjax.core import mesh as meshlib
from qjax.core.errors import InputError
from qjax.io import assets, checkpoint, gguf_load, hf, hf_gptq
from qjax.models import sharding

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
  """argparse with a one-line error message (no usage dump) and exit status 2."""

  def error(self, message):
    self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def run_guarded(fn, argv, prog: str) -> int:
  """Runs ``fn(argv)``; bad input becomes ``prog: error: ...`` on stderr and exit status 2, no traceback."""
  try:
    return fn(argv) or 0
  except InputError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


def given_flags(parser: argparse.ArgumentParser, argv, args) -> frozenset[str]:
  """The option destinations the user set on the command line (even to their default value): ``argv`` parsed
  again into a namespace pre-filled with sentinels (argparse only fills in defaults that are absent), so a
  destination still holding its sentinel was not given."""
  unset = object()
  sentinels = {k: [] if isinstance(v, list) else unset for k, v in vars(args).items()}
  ns = parser.parse_args(sys.argv[1:] if argv is None else argv, namespace=argparse.Namespace(**sentinels))
  return frozenset(k for k, v in vars(ns).items() if v is not sentinels[k])


_FLAG_NAMES = {"sym_act": "--sym-act/--asym", "act_order": "--act-order/--no-act-order",
               "static_groups": "--static-groups/--no-static-groups"}


def flag(dest: str) -> str:
  """The command-line spelling of an option destination (``kv_bits`` -> ``--kv-bits``)."""
  return _FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))


def check_scopes(given: frozenset[str], scopes):
  """Refuses flags that would be accepted and do nothing: ``scopes`` is an iterable of ``(dests, applies,
  needs)``; when ``applies`` is false and the user set one of ``dests``, the error says it needs ``needs``."""
  for dests, applies, needs in scopes:
    used = [flag(d) for d in dests if d in given]
    if used and not applies:
      raise InputError(f"{', '.join(used)} {'has' if len(used) == 1 else 'have'} no effect without {needs}")


def add_model_args(p: argparse.ArgumentParser):
  src = p.add_mutually_exclusive_group()
  src.add_argument("--model", help="Hugging Face model folder, GGUF file, or a named model (smollm2-135m, "
                                   "stories260k; default: assets stories260K)")
  src.add_argument("--load", help="a checkpoint saved by qjax (--save)")
  p.add_argument("--dtype", default="float32", choices=sorted(models.DTYPES), help="compute dtype")
  p.add_argument("--kernel", default="auto", choices=models.KERNELS,
                 help="qmatmul implementation of every linear: auto (the platform's kernels where they apply, else "
                      "the XLA reference), xla (the reference: dequantize + matmul), or one kernel (falling back to "
                      "the reference for what it does not cover)")
  p.add_argument("--seed", type=int, default=0)
  d = p.add_argument_group("devices")
  d.add_argument("--mesh", help="data=D,model=M: split the work over D x M devices (calibration windows, batches and "
                                "FSDP over data; tensor-parallel linears over model); on CPU give the devices with "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=N")
  d.add_argument("--coordinator", default=os.environ.get("QJAX_COORDINATOR"),
                 help="HOST:PORT of process 0 for a multi-process run (jax.distributed; env QJAX_COORDINATOR)")
  d.add_argument("--num-processes", type=int, default=os.environ.get("QJAX_NUM_PROCESSES", "1"),
                 help="processes of the run (env QJAX_NUM_PROCESSES)")
  d.add_argument("--process-id", type=int, default=os.environ.get("QJAX_PROCESS_ID", "0"),
                 help="this process's id, 0 .. N-1 (env QJAX_PROCESS_ID); process 0 prints and writes the outputs")


def setup_devices(args) -> "meshlib.Mesh | None":
  """Joins the ``jax.distributed`` run the flags describe (before any JAX work) and builds ``--mesh``. Processes
  other than 0 print nothing (stdout is discarded there) and write nothing."""
  meshlib.ProcessConfig(coordinator=args.coordinator, num_processes=args.num_processes,
                        process_id=args.process_id).initialize()
  if jax.process_index() != 0:
    sys.stdout = open(os.devnull, "w")  # for the rest of the process
    args.no_progress = True
  return meshlib.MeshConfig.parse(args.mesh).build() if args.mesh else None


def is_writer() -> bool:
  """Whether this process writes outputs (process 0 of a multi-process run, or the only one)."""
  return jax.process_index() == 0


def host_params(params):
  """``params`` with every array whole on the host: what a writer needs from a multi-process run (every process
  must call it: it gathers); one process: unchanged."""
  return params if jax.process_count() == 1 else jax.tree.map(meshlib.to_host, params)


def model_source(args) -> Path:
  """What ``--model`` / ``--load`` names: a folder, a GGUF file, or a named model's path."""
  if args.load:
    return Path(args.load)
  return assets.model_path(args.model) if args.model else assets.asset(assets.DEFAULT_MODEL)


def model_dir(args) -> Path:
  """The folder holding config.json and tokenizer files (for a GGUF file: its cached HF view)."""
  src = model_source(args)
  return gguf_load.hf_view(src) if gguf_load.is_gguf(src) else src


def model_config(args):
  """The architecture (``config.json``) of the ``--model``/``--load`` source, or None when it has none (the
  loader then reports the problem)."""
  d = model_dir(args)
  return models.ModelConfig.from_dir(d) if (d / "config.json").is_file() else None


def load_model(args):
  """``(CausalLM, params, meta)``. ``meta`` describes an already quantized source: the checkpoint metadata with
  ``--load`` (``meta["loaded"] = "qjax checkpoint"``), or for an HF GPTQ folder given as ``--model`` a
  ``method`` entry built from its ``quantization_config`` (``meta["loaded"] = "HF GPTQ checkpoint"``); ``None``
  for a float model."""
  mesh = setup_devices(args)
  d = model_dir(args)
  if args.load:
    meta = checkpoint.read_meta(d)
    model = models.CausalLM(models.ModelConfig.from_dir(d), meta["dtype"], kernel=args.kernel, mesh=mesh)
    params, meta = checkpoint.load_params(d)
    return model, sharding.shard_params(model, params), {**meta, "loaded": "qjax checkpoint"}
  model, params = hf.load_model(model_source(args), args.dtype)
  model = model.with_kernel(args.kernel).with_mesh(mesh)
  params = sharding.shard_params(model, params)
  qc = hf_gptq.quantization_config_of(d)
  if qc is None:
    return model, params, None
  config = {k: qc.get(k) for k in ("bits", "group_size", "sym", "desc_act", "checkpoint_format")}
  return model, params, {"method": {"name": "hf-gptq", "config": config}, "loaded": "HF GPTQ checkpoint"}


GENERATED = "generated"   # --calib-dataset: the float model's own text (qjax.evaluation.data_free)


def calibration_text(args) -> Path:
  """``--calib-text``, else the named calibration text: ``--calib-dataset``, else the calibration text paired with
  the first named evaluation text (never the evaluation text itself), else TinyStories'."""
  if getattr(args, "calib_text", None):
    return Path(args.calib_text)
  name = getattr(args, "calib_dataset", None)
  if name == GENERATED:
    raise InputError("--calib-dataset generated (the model's own text) trains and calibrates weight methods; this "
                     "step reads a calibration text: give --calib-text or a named --calib-dataset")
  if name is None:
    named = [n.strip() for n in (getattr(args, "ppl_datasets", None) or "").split(",")]
    name = next((n for n in named if n in assets.CALIB_DATASETS), "tinystories")
  return assets.named_text(name, assets.CALIB_DATASETS)


def write_json(path, obj):
  """Atomic JSON write (temporary file + rename; missing parent folders created)."""
  with checkpoint.atomic_file(path) as f:
    json.dump(obj, f, indent=1)


def format_table(headers, rows) -> str:
  cells = [list(map(str, headers))] + [[_fmt(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
  sep = "  ".join("-" * w for w in widths)
  return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(c):
  if isinstance(c, float):
    return f"{c:.4g}" if abs(c) < 1e4 else f"{c:,.0f}"
  return str(c)
