"""Hugging Face checkpoint folders -> qjax parameter pytrees.

Reads ``config.json`` and single or sharded ``*.safetensors`` (with ``model.safetensors.index.json``), renames
tensors with :func:`qjax.models.families.hf_to_path`, casts to the compute dtype, checks every tensor is finite
and that the set of tensors and their shapes is exactly what the architecture needs. The source folder is only
read, never written.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from qjax.core import tree
from qjax.core.deferred import Deferred
from qjax.core.errors import InputError
from qjax.models.config import DTYPES
from qjax.models.families import hf_to_path


def safetensors_files(path: Path) -> list[Path]:
  index = path / "model.safetensors.index.json"
  if index.is_file():
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    files = [path / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
      raise InputError(f"shard(s) listed in {index} are missing: {', '.join(missing)}")
    return files
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise InputError(f"model path {path} has no *.safetensors weights")
  return files


def _damaged(f, e) -> InputError:
  first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
  return InputError(f"cannot read {f}: damaged or truncated safetensors file ({first})")


def read_tensors(path: Path, keep=lambda key: True) -> dict[str, np.ndarray]:
  """``{hf_key: array}`` of the tensors in the folder's safetensors files whose key ``keep`` accepts (bfloat16
  kept as ml_dtypes); the others are only listed: ``{hf_key: SafetensorsTensor}`` (nothing read)."""
  out = {}
  for f in safetensors_files(path):
    try:
      with safe_open(str(f), framework="flax") as fh:
        for k in fh.keys():
          if keep(k):
            out[k] = np.asarray(fh.get_tensor(k))
          else:
            sl = fh.get_slice(k)
            out[k] = SafetensorsTensor(str(f), k, tuple(sl.get_shape()), sl.get_dtype())
    except (SafetensorError, OSError, ValueError, TypeError) as e:
      raise _damaged(f, e) from None
  return out


_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclasses.dataclass(frozen=True)
class SafetensorsTensor(Deferred):
  """One tensor of a safetensors file, read (memory-mapped, then copied) only when :meth:`load` is called;
  ``dtype`` is the compute dtype it is cast to (set by :func:`load_params`), ``stored`` the file's dtype."""
  file: str
  key: str
  shape: tuple[int, ...]
  stored: str
  dtype: str = "float32"

  @property
  def nbytes(self) -> int:
    return self.size * _ITEMSIZE.get(self.stored, 4)

  def load(self):
    try:
      with safe_open(self.file, framework="flax") as fh:
        arr = np.asarray(fh.get_tensor(self.key))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
      raise _damaged(self.file, e) from None
    if not np.all(np.isfinite(arr.astype(np.float32))):
      raise InputError(f"checkpoint tensor {self.key} in {self.file} contains NaN or Inf values")
    return jnp.asarray(arr, dtype=DTYPES[self.dtype])


def dense_params(path: Path, tensors: dict[str, np.ndarray], tied: bool) -> dict[str, np.ndarray]:
  """``{param path: array}`` of HF ``tensors`` (rotary buffers and a tied ``lm_head`` dropped), checked finite."""
  flat = {}
  for key, arr in tensors.items():
    p = hf_to_path(key)
    if p.endswith("rotary_emb/inv_freq") or (tied and p == "lm_head/weight"):
      continue
    if isinstance(arr, SafetensorsTensor):   # checked when read
      flat[p] = arr
      continue
    if not np.all(np.isfinite(arr.astype(np.float32))):
      raise InputError(f"checkpoint tensor {key} in {path} contains NaN or Inf values")
    flat[p] = arr
  return flat


def check_shapes(path: Path, flat: dict, expected_shapes: dict[str, tuple]) -> None:
  """Raises InputError unless ``flat`` (arrays or QArrays) has exactly the expected paths and shapes."""
  missing = sorted(set(expected_shapes) - set(flat))
  extra = sorted(set(flat) - set(expected_shapes))
  if missing or extra:
    raise InputError(f"checkpoint {path} does not match its config: missing {missing[:3]}, unexpected {extra[:3]}")
  for p, shape in expected_shapes.items():
    if tuple(flat[p].shape) != tuple(shape):
      raise InputError(f"checkpoint tensor {p} has shape {flat[p].shape}, config implies {tuple(shape)}")


def load_params(path, expected_shapes: dict[str, tuple], dtype: str, tied: bool, defer=None) -> dict:
  """Parameter pytree for ``expected_shapes`` (``{path: shape}``, from the architecture) in ``dtype``.

  ``defer(param_path) -> bool`` (streaming): the parameters it accepts stay on disk as
  :class:`SafetensorsTensor` leaves (read when the layer-wise calibration reaches them), the rest are read now."""
  path = Path(path)
  keep = (lambda key: True) if defer is None else (lambda key: not defer(hf_to_path(key)))
  flat = dense_params(path, read_tensors(path, keep), tied)
  check_shapes(path, flat, expected_shapes)
  dt = DTYPES[dtype]
  return tree.unflatten({p: dataclasses.replace(a, dtype=dtype) if isinstance(a, SafetensorsTensor)
                         else jnp.asarray(a, dtype=dt) for p, a in flat.items()})
