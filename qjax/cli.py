"""Shared command-line plumbing: one-line errors with exit status 2, model loading from ``--model``/``--load``,
the quantization flags, summary tables and atomic JSON output."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from qjax import assets, checkpoint, models
from qjax.errors import InputError

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


def add_model_args(p: argparse.ArgumentParser):
  src = p.add_mutually_exclusive_group()
  src.add_argument("--model", help="Hugging Face model folder (default: assets stories260K)")
  src.add_argument("--load", help="a checkpoint saved by qjax (--save)")
  p.add_argument("--dtype", default="float32", choices=sorted(models.hf.DTYPES), help="compute dtype")
  p.add_argument("--seed", type=int, default=0)


def model_dir(args) -> Path:
  """The folder holding config.json and tokenizer files."""
  return Path(args.load) if args.load else Path(args.model) if args.model else assets.asset(assets.DEFAULT_MODEL)


def load_model(args):
  """``(CausalLM, params, meta)``; meta is the checkpoint metadata with ``--load``, else ``None``."""
  d = model_dir(args)
  if args.load:
    meta = checkpoint.read_meta(d)
    model = models.CausalLM(models.ModelConfig.from_dir(d), meta["dtype"])
    params, meta = checkpoint.load_params(d)
    return model, params, meta
  model, params = models.load(d, args.dtype)
  return model, params, None


def write_json(path, obj):
  """Atomic JSON write (temporary file + rename)."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=1)
  os.chmod(tmp, 0o666 & ~checkpoint.current_umask())
  os.replace(tmp, path)


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
