"""qjax checkpoints: an orbax checkpoint of the (possibly quantized) parameter pytree plus JSON metadata.

Layout of a checkpoint folder::

    config.json         the source model's HF config (architecture)
    qjax.json           format version, compute dtype, method and its config, the type and static fields of every
                        quantized tensor (QArray, ...)
    params/             orbax StandardCheckpointer of the tree, each quantized tensor stored as a dict of its arrays
    tokenizer files     copied from the source model folder

Saving is atomic: everything is written into a temporary sibling folder that is renamed into place at the end,
so an interrupted save leaves no partial checkpoint (and the source model folder is only read).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from qjax import tree
from qjax.errors import InputError
from qjax.qarray import QUANTIZED_TYPES, QuantizedTensor, data_fields, static_fields

FORMAT = "qjax-checkpoint-v1"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


def check_destination(dest, overwrite: bool) -> Path:
  """Validates an output path up front (before any long work)."""
  dest = Path(dest)
  if dest.exists() and not overwrite:
    raise InputError(f"output path {dest} already exists (pass --overwrite to replace it)")
  if not dest.resolve().parent.is_dir():
    raise InputError(f"parent folder of {dest} does not exist")
  return dest


def save(dest, params, *, source_dir, dtype: str, method: dict, overwrite: bool = False,
         kv_calibration: dict | None = None) -> Path:
  """Writes ``params`` (with QArrays) and metadata to ``dest`` atomically. Returns ``dest``.

  ``kv_calibration`` (``{"metadata": JSON-able, "arrays": {name: array}}``, e.g. KVQuant's) is stored as
  ``kv_calibration.npz`` plus an entry of ``qjax.json``; :func:`load_kv_calibration` reads it back."""
  dest = check_destination(dest, overwrite).resolve()
  source_dir = Path(source_dir)
  flat, qmeta = {}, {}
  for path, leaf in tree.flatten(params).items():
    if isinstance(leaf, QuantizedTensor):
      cls = type(leaf)
      qmeta[path] = {"type": cls.__name__, "module": cls.__module__,
                     **{k: getattr(leaf, k) for k in static_fields(cls)}}
      flat.update({f"{path}/{k}": getattr(leaf, k) for k in data_fields(cls) if getattr(leaf, k) is not None})
    else:
      flat[path] = leaf
  with atomic_dir(dest) as tmp:
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp / "params", tree.unflatten(flat))
    ckpt.wait_until_finished()
    shutil.copy2(source_dir / "config.json", tmp / "config.json")
    copy_tokenizer(source_dir, tmp)
    meta = {"format": FORMAT, "dtype": dtype, "method": method, "qarrays": qmeta}
    if kv_calibration is not None:
      meta["kv_calibration"] = kv_calibration["metadata"]
      np.savez(tmp / "kv_calibration.npz", **{k.replace("/", "."): np.asarray(v)
                                              for k, v in kv_calibration["arrays"].items()})
    (tmp / "qjax.json").write_text(json.dumps(meta, indent=1))
  return dest


def load_kv_calibration(path) -> dict | None:
  """The ``kv_calibration`` saved by :func:`save` (None when the checkpoint has none)."""
  meta = read_meta(path)
  if "kv_calibration" not in meta:
    return None
  with np.load(Path(path) / "kv_calibration.npz") as z:
    arrays = {k.replace(".", "/"): z[k] for k in z.files}
  return {"metadata": meta["kv_calibration"], "arrays": arrays}


@contextlib.contextmanager
def atomic_dir(dest: Path):
  """Yields a temporary sibling folder of ``dest`` that replaces ``dest`` only if the block completes."""
  tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~current_umask())
    if dest.exists():
      shutil.rmtree(dest)
    os.rename(tmp, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def copy_tokenizer(source_dir: Path, dest: Path):
  """Copies the tokenizer (and generation config) files that exist in ``source_dir``."""
  for name in TOKENIZER_FILES:
    if (source_dir / name).is_file():
      shutil.copy2(source_dir / name, dest / name)


def current_umask() -> int:
  """The process umask (atomic writes start from private temporary files; outputs get the usual modes)."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


def read_meta(path) -> dict:
  path = Path(path)
  meta = path / "qjax.json"
  if not path.is_dir():
    raise InputError(f"checkpoint path {path} does not exist or is not a directory")
  if not meta.is_file() or not (path / "params").is_dir():
    raise InputError(f"{path} is not a qjax checkpoint (no qjax.json or params/)")
  d = json.loads(meta.read_text())
  if d.get("format") != FORMAT:
    raise InputError(f"{path} has unsupported checkpoint format {d.get('format')!r}")
  return d


def load_params(path) -> tuple[dict, dict]:
  """``(params, meta)`` from a checkpoint written by :func:`save` (quantized tensors rebuilt from metadata)."""
  path = Path(path).resolve()
  meta = read_meta(path)
  flat = tree.flatten(ocp.StandardCheckpointer().restore(path / "params"))
  for qpath, static in meta["qarrays"].items():
    static = dict(static)
    importlib.import_module(static.pop("module", "qjax.qarray"))  # registers the type
    cls = QUANTIZED_TYPES[static.pop("type")]
    fields = {k: (None if f"{qpath}/{k}" not in flat else jnp.asarray(flat.pop(f"{qpath}/{k}")))
              for k in data_fields(cls)}
    static = {k: tuple(v) if isinstance(v, list) else v for k, v in static.items()}
    flat[qpath] = cls(**fields, **static)
  return tree.unflatten({k: (v if isinstance(v, QuantizedTensor) else jnp.asarray(v)) for k, v in flat.items()}), meta
