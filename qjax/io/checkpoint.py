"""qjax checkpoints: an orbax checkpoint of the (possibly quantized) parameter pytree plus JSON metadata.

Layout of a checkpoint folder::

    config.json         the source model's HF config (architecture)
    qjax.json           format version, compute dtype, method and its config, the type and static fields of every
                        quantized tensor (QArray, ...), and ``parts``: which folder holds which subtree
    params/             orbax StandardCheckpointer of the tree outside the decoder layers (all of it in v1), each
                        quantized tensor stored as a dict of its arrays
    layers/<i>/         the same for decoder layer ``i`` (paths relative to it): a streaming run writes each layer
                        as soon as it is quantized (:mod:`qjax.io.streaming`), and a reader may restore one layer
    tokenizer files     copied from the source model folder

Saving is atomic: everything is written into a temporary sibling folder that is renamed into place at the end,
so an interrupted save leaves no partial checkpoint (and the source model folder is only read).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from qjax.core import tree
from qjax.core.errors import InputError
from qjax.core.formats import QUANTIZED_TYPES, QuantizedTensor  # the package: every stored format registered
from qjax.core.formats.base import data_fields, static_fields

FORMAT = "qjax-checkpoint-v2"
READABLE_FORMATS = ("qjax-checkpoint-v1", FORMAT)   # v1: one part, params/ holds the whole tree
# Checkpoints name each quantized tensor's type and module; only qjax's own stored formats (the types registered
# by :mod:`qjax.core.formats`) are accepted, and loading never imports anything. Module names that
# checkpoints written before the formats moved into ``qjax.core.formats`` carry are accepted as aliases.
LEGACY_FORMAT_MODULES = {"qjax.qarray": "qjax.core.formats.qarray", "qjax.int8": "qjax.core.formats.int8",
                         "qjax.methods.spqr": "qjax.core.formats.spqr"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
                   "gguf_tokenizer.json")  # the last: a GGUF source's tokenizer metadata (qjax.io.gguf_load)


def check_destination(dest, overwrite: bool, what: str = "output path") -> Path:
  """Validates an output path up front (before any long work): ``dest`` must not exist (unless ``overwrite``)
  and its nearest existing ancestor must be a folder this process can create files in (checked by creating and
  removing a probe file, which also catches read-only file systems and root-owned folders). Missing parent
  folders are fine: the writers create them when they write (:func:`atomic_dir`, :func:`atomic_file`)."""
  dest = Path(dest)
  if dest.exists() and not overwrite:
    raise InputError(f"{what} {dest} already exists (pass --overwrite to replace it)")
  base = dest.absolute().parent
  while not base.exists():
    base = base.parent
  if not base.is_dir():
    raise InputError(f"{what} {dest} cannot be created: {base} is not a folder")
  try:
    fd, probe = tempfile.mkstemp(prefix=".qjax-write-probe-", dir=base)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise InputError(f"{what} {dest} cannot be written: {base}: {e.strerror or e}") from None
  return dest


def _write_base(dest: Path) -> Path:
  """The nearest existing ancestor folder of ``dest``, where its temporary sibling is made."""
  base = dest.parent
  while not base.exists():
    base = base.parent
  return base


def _publish(tmp: Path, dest: Path):
  """Creates ``dest``'s missing parent folders and renames ``tmp`` to ``dest`` (replacing a folder there)."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  if dest.is_dir() and not dest.is_symlink():
    shutil.rmtree(dest)
  elif tmp.is_dir() and (dest.exists() or dest.is_symlink()):
    dest.unlink()
  os.replace(tmp, dest)


@contextlib.contextmanager
def atomic_path(dest):
  """Yields a temporary file path (for writers that open files themselves) that replaces ``dest`` only if the
  block completes (rename; missing parent folders are created at the end, so nothing is created on failure)."""
  dest = Path(dest).absolute()
  fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=_write_base(dest))
  os.close(fd)
  try:
    yield Path(tmp)
    os.chmod(tmp, 0o666 & ~current_umask())
    _publish(Path(tmp), dest)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_file(dest, mode: str = "w"):
  """Yields a file object whose contents replace ``dest`` only if the block completes (see :func:`atomic_path`)."""
  with atomic_path(dest) as tmp, open(tmp, mode) as f:
    yield f


def save(dest, params, *, source_dir, dtype: str, method: dict, overwrite: bool = False,
         kv_calibration: dict | None = None, recipe: dict | None = None, layer_paths: tuple[str, ...] = ()) -> Path:
  """Writes ``params`` (with QArrays) and metadata to ``dest`` atomically. Returns ``dest``.

  ``layer_paths`` (the family's ``model/layers_<i>``): each of these subtrees is its own part ``layers/<i>/``.
  ``kv_calibration`` (``{"metadata": JSON-able, "arrays": {name: array}}``, e.g. KVQuant's) is stored as
  ``kv_calibration.npz`` plus an entry of ``qjax.json``; :func:`load_kv_calibration` reads it back."""
  dest = check_destination(dest, overwrite).resolve()
  with atomic_dir(dest) as tmp:
    write_folder(tmp, params, source_dir=source_dir, dtype=dtype, method=method, kv_calibration=kv_calibration,
                 recipe=recipe, layer_paths=layer_paths)
  return dest


def write_part(folder: Path, flat: dict) -> dict:
  """One part: ``flat`` (``{relative path: array or quantized tensor}``) as an orbax checkpoint in ``folder``.
  Returns the part's ``{relative path: type and static fields}`` of its quantized tensors."""
  arrays, qmeta = {}, {}
  for path, leaf in flat.items():
    if isinstance(leaf, QuantizedTensor):
      cls = type(leaf)
      qmeta[path] = {"type": cls.__name__, "module": cls.__module__,
                     **{k: getattr(leaf, k) for k in static_fields(cls)}}
      fields = {k: getattr(leaf, k) for k in data_fields(cls) if getattr(leaf, k) is not None}
      empty = {k: {"shape": list(v.shape), "dtype": str(np.dtype(v.dtype))} for k, v in fields.items() if v.size == 0}
      if empty:               # e.g. a SpQR matrix without outliers: orbax stores no zero-size array
        qmeta[path]["empty"] = empty
      arrays.update({f"{path}/{k}": v for k, v in fields.items() if k not in empty})
    else:
      arrays[path] = leaf
  ckpt = _checkpointer()
  ckpt.save(folder, tree.unflatten(arrays))
  ckpt.wait_until_finished()
  return qmeta


def layer_part(i: int) -> str:
  return f"layers/{i}"


def write_folder(folder: Path, params, *, source_dir, dtype: str, method: dict, kv_calibration: dict | None = None,
                 recipe: dict | None = None, layer_paths: tuple[str, ...] = (), written: dict | None = None):
  """Fills ``folder`` (a temporary one, published by the caller) with the checkpoint of ``params``.
  ``written``: ``{part: its write_part result}`` of layer parts already in ``folder`` (a streaming run's); their
  leaves in ``params`` are placeholders and are not written again."""
  source_dir = Path(source_dir)
  written = written or {}
  flat = tree.flatten(params)
  parts, qmeta = {}, {}
  for i, prefix in enumerate(layer_paths):
    sub = {p[len(prefix) + 1:]: flat.pop(p) for p in [p for p in flat if p.startswith(prefix + "/")]}
    name = layer_part(i)
    part_meta = written[name] if name in written else write_part(folder / name, sub)
    parts[name] = prefix
    qmeta.update({f"{prefix}/{p}": m for p, m in part_meta.items()})
  qmeta.update(write_part(folder / "params", flat))
  parts["params"] = ""
  shutil.copy2(source_dir / "config.json", folder / "config.json")
  copy_tokenizer(source_dir, folder)
  meta = {"format": FORMAT, "dtype": dtype, "method": method, "qarrays": qmeta, "parts": parts}
  if recipe is not None:
    meta["recipe"] = recipe  # qjax.api.Recipe.to_dict() of what made the checkpoint
  if kv_calibration is not None:
    meta["kv_calibration"] = kv_calibration["metadata"]
    np.savez(folder / "kv_calibration.npz", **{k.replace("/", "."): np.asarray(v)
                                               for k, v in kv_calibration["arrays"].items()})
  (folder / "qjax.json").write_text(json.dumps(meta, indent=1))


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
  """Yields a temporary folder that replaces ``dest`` only if the block completes. Missing parent folders of
  ``dest`` are created only then (nothing is left behind when the block fails); every file written gets the
  usual mode (``0666 & ~umask``, folders ``0777 & ~umask``) whatever mode its writer chose."""
  dest = Path(dest).absolute()
  tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=_write_base(dest)))
  try:
    yield tmp
    publish_dir(tmp, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def publish_dir(tmp: Path, dest: Path):
  """Gives everything in the finished folder ``tmp`` the usual modes and renames it to ``dest``."""
  umask = current_umask()
  for p in [tmp, *tmp.rglob("*")]:
    if not p.is_symlink():
      os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
  _publish(tmp, Path(dest).absolute())


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
  """The checkpoint's ``qjax.json`` (InputError, naming the problem, for anything that is not a readable qjax
  checkpoint of this format)."""
  path = Path(path)
  meta = path / "qjax.json"
  if not path.is_dir():
    raise InputError(f"checkpoint path {path} does not exist or is not a directory")
  if not meta.is_file() or not (path / "params").is_dir():
    raise InputError(f"{path} is not a qjax checkpoint (no qjax.json or params/)")
  try:
    d = json.loads(meta.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f"checkpoint {path}: qjax.json is damaged ({e})") from None
  if not isinstance(d, dict) or d.get("format") not in READABLE_FORMATS:
    raise InputError(f"{path} has unsupported checkpoint format {d.get('format') if isinstance(d, dict) else d!r}")
  if not isinstance(d.get("qarrays"), dict) or not isinstance(d.get("method"), dict) or "dtype" not in d:
    raise InputError(f"checkpoint {path}: qjax.json lacks its 'method', 'dtype' or 'qarrays' entries")
  parts = d.setdefault("parts", {"params": ""})
  if (not isinstance(parts, dict) or any(not isinstance(k, str) or not isinstance(v, str) for k, v in parts.items())
      or any(not _PART.fullmatch(k) for k in parts)):
    raise InputError(f"checkpoint {path}: qjax.json has a malformed 'parts' entry")
  return d


def _quantized_type(path: Path, qpath: str, static: dict) -> type:
  """The stored tensor type named in ``qjax.json``, resolved ONLY among qjax's own registered quantized types
  (:data:`QUANTIZED_TYPES`, the classes of :mod:`qjax.core.formats`); a module or type outside them is refused,
  never imported."""
  module, name = static.pop("module", "qjax.core.formats.qarray"), static.pop("type", None)
  module = LEGACY_FORMAT_MODULES.get(module, module)
  allowed = sorted({c.__module__ for c in QUANTIZED_TYPES.values()})
  if module not in allowed:
    raise InputError(f"checkpoint {path}: {qpath} names module {module!r}, which is not one of qjax's quantized "
                     f"tensor modules ({', '.join(allowed)})")
  cls = QUANTIZED_TYPES.get(name)
  if cls is None or cls.__module__ != module:
    raise InputError(f"checkpoint {path}: {qpath} has unknown quantized tensor type {name!r}")
  return cls


def load_params(path) -> tuple[dict, dict]:
  """``(params, meta)`` from a checkpoint written by :func:`save` (quantized tensors rebuilt from metadata).
  A damaged checkpoint (unreadable arrays, arrays missing under ``params/``, inconsistent metadata) raises
  InputError naming what is wrong."""
  path = Path(path).resolve()
  meta = read_meta(path)
  flat = {}
  for part, prefix in meta["parts"].items():
    flat.update({f"{prefix}/{p}" if prefix else p: v for p, v in read_part(path, part).items()})
  return tree.unflatten(rebuild(path, flat, meta["qarrays"])), meta


def read_layer(path: Path, part: str, qmeta: dict) -> dict:
  """One layer part alone (``qmeta``: its quantized tensors' entries, paths relative to the layer) -> its tree."""
  return tree.unflatten(rebuild(Path(path), read_part(Path(path), part), qmeta))


def rebuild(path: Path, flat: dict, qarrays: dict) -> dict:
  """``{path: array or quantized tensor}`` from the stored arrays ``flat`` (quantized tensors split into their
  fields) and their ``qarrays`` metadata; types only from qjax's own registry (:func:`_quantized_type`)."""
  flat = dict(flat)
  for qpath, static in qarrays.items():
    static = dict(static)
    cls = _quantized_type(path, qpath, static)
    try:
      flat.update({f"{qpath}/{k}": np.zeros(e["shape"], e["dtype"]) for k, e in static.pop("empty", {}).items()})
    except (TypeError, KeyError, ValueError) as e:
      raise InputError(f"checkpoint {path}: {qpath} has a malformed 'empty' entry ({e})") from None
    required = [f.name for f in dataclasses.fields(cls) if f.name in data_fields(cls) and "None" not in str(f.type)]
    missing = [f"{qpath}/{k}" for k in required if f"{qpath}/{k}" not in flat]
    if missing:
      raise InputError(f"checkpoint {path}: its arrays lack {', '.join(missing[:3])}")
    fields = {k: (None if f"{qpath}/{k}" not in flat else jnp.asarray(flat.pop(f"{qpath}/{k}")))
              for k in data_fields(cls)}
    static = {k: tuple(v) if isinstance(v, list) else v for k, v in static.items()}
    try:
      flat[qpath] = cls(**fields, **static)
    except (TypeError, ValueError) as e:
      raise InputError(f"checkpoint {path}: {qpath} cannot be rebuilt as {cls.__name__} ({e})") from None
  return {k: (v if isinstance(v, QuantizedTensor) else jnp.asarray(v)) for k, v in flat.items()}


_PART = re.compile(r"params|layers/\d+")   # part folders a checkpoint may name (never a path outside it)


def read_part(path: Path, part: str) -> dict:
  """``{relative path: array}`` of one part's arrays (quantized tensors still split into their fields)."""
  try:
    return tree.flatten(_checkpointer().restore(path / part))
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise InputError(f"checkpoint {path}: the arrays under {part}/ cannot be read ({first})") from None


def _checkpointer():
  """An orbax checkpointer of this process alone: qjax checkpoints hold host arrays, written (and read) by one
  process, so a ``jax.distributed`` run's writer never waits at orbax's barriers for processes that do not save."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(
      multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))
