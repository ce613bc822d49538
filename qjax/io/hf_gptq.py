"""Hugging Face GPTQ checkpoints (the v1 ``"gptq"`` format read by transformers + optimum, GPTQModel and vLLM).

One quantized linear ``W [out, in]`` with ``b`` bits and group size ``g`` (``g = in`` per channel, ``G = in / g``)::

    <module>.qweight  int32 [in*b/32, out]  codes packed along the INPUT axis (qjax.core.packing bitstream, axis 0)
    <module>.qzeros   int32 [G, out*b/32]   zero points minus one, packed along the OUTPUT axis
    <module>.scales   float16 [G, out]
    <module>.g_idx    int32 [in]            group of each input row (not sorted under act-order)

    W[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1))

Every other tensor keeps its HF name and dtype. Mixed precision (a recipe with several bit widths, group sizes
or symmetries) is written as one base config plus a GPTQModel positive ``dynamic`` rule
``"+:^<module>$": {bits, group_size, sym}`` per module that differs (GPTQModel, vLLM; the importer here reads
them). A QArray the format cannot hold is written dense, in its own dtype, and excluded in
``quantization_config`` for both families of loaders: ``dynamic`` gets one negative rule ``"-:^<module>$": {}``
per excluded module (GPTQModel, vLLM) and ``modules_in_block_to_quantize`` lists the quantized modules
(transformers + optimum, vLLM).
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from qjax.core import packing, tree
from qjax.core.errors import InputError
from qjax.core.formats.qarray import QArray
from qjax.io import checkpoint
from qjax.io import safetensors as hf
from qjax.models.config import DTYPES
from qjax.models.families import DECODER_LINEARS, hf_to_path, path_to_hf

BITS = (2, 3, 4, 8)
FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> offset added to the stored zero points
_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_RESERVED = ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format", "lm_head", "dynamic",
             "modules_in_block_to_quantize")
DEFAULTS = {"true_sequential": True, "damp_percent": 0.01, "static_groups": False}


def _group(n: int, group_size: int) -> int:
  return n if group_size == -1 else group_size


def _zeros(w: QArray) -> np.ndarray:
  """Integer zero points ``[out, G]`` int32 on the host (the symmetric constant when not stored)."""
  return np.full(w.scale.shape, 2 ** (w.bits - 1), np.int32) if w.zero is None else np.asarray(w.zero, np.int32)


def unsupported_reason(path: str, w: QArray, *, bits: int, group_size: int, sym: bool, desc_act: bool) -> str | None:
  """Why the QArray at parameter ``path`` cannot be one GPTQ linear under this config, or None if it can."""
  out, n = w.shape
  g = _group(n, w.group_size)
  if not any(re.fullmatch(p, path) for p in DECODER_LINEARS):
    return "not a decoder-layer linear (GPTQ loaders only quantize linears inside the decoder blocks)"
  if w.bits != bits:
    return f"{w.bits}-bit codes, config bits={bits}"
  if g != _group(n, group_size):
    return f"group size {w.group_size}, config group_size={group_size}"
  if n % 32:
    return f"input width {n} is not a multiple of 32"
  if n % g:
    return f"input width {n} is not a multiple of the group size {g}"
  if out * bits % 32:
    return f"output width {out} * {bits} bits is not a multiple of 32"
  if sym and not w.sym:
    return "asymmetric codes, config sym=True"
  if w.perm is not None and n > g and not desc_act:
    return "act-order columns, config desc_act=False"
  zero = _zeros(w)
  if zero.min() < 1 or zero.max() > 2**bits:
    return f"a zero point outside 1..{2**bits} (the v1 format stores zero - 1 in {bits} bits)"
  with np.errstate(over="ignore"):
    if not np.all(np.isfinite(np.asarray(w.scale, np.float16))):
      return "scales overflow float16"
  return None


def gptq_tensors(w: QArray) -> dict[str, np.ndarray]:
  """``{qweight, qzeros, scales, g_idx}`` of a QArray that :func:`unsupported_reason` accepts (codes un-permuted)."""
  out, n = w.shape
  g = _group(n, w.group_size)
  codes = np.asarray(w.unpacked_codes())                          # [out, in] in stored column order
  g_idx = np.arange(n) // g
  if w.perm is not None:
    inv = np.argsort(np.asarray(w.perm))                          # stored column of original column i
    codes, g_idx = codes[:, inv], inv // g
  qweight = packing.pack(codes.T, bits=w.bits, axis=0)
  qzeros = packing.pack(_zeros(w).T - 1, bits=w.bits, axis=1)[:, : out * w.bits // 32]
  return {"qweight": np.asarray(qweight).view(np.int32), "qzeros": np.asarray(qzeros).view(np.int32),
          "scales": np.ascontiguousarray(np.asarray(w.scale, np.float16).T), "g_idx": g_idx.astype(np.int32)}


def _version() -> str:
  try:
    return importlib.metadata.version("qjax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def quantization_config(*, bits: int, group_size: int, sym: bool, desc_act: bool, quantized: list[str],
                        excluded: list[str], extra_config: dict | None = None,
                        overrides: dict[str, dict] | None = None) -> dict:
  """The ``quantization_config`` entry of ``config.json``: the base settings, one GPTQModel positive ``dynamic``
  rule ``"+:^<module>$": {bits, group_size, sym}`` per module of ``overrides`` (mixed precision), and exclusions
  only when some module is excluded."""
  clash = sorted(set(extra_config or {}) & set(_RESERVED))
  if clash:
    raise ValueError(f"extra_config may not set {clash}: they follow from the exported tensors")
  qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
        "checkpoint_format": "gptq", "lm_head": False, **DEFAULTS, "meta": {"quantizer": [f"qjax:{_version()}"]},
        **(extra_config or {})}
  dynamic = {f"+:^{re.escape(m)}$": o for m, o in sorted((overrides or {}).items())}
  dynamic.update({f"-:^{re.escape(m)}$": {} for m in excluded})
  if dynamic:
    qc["dynamic"] = dynamic
  if excluded:
    qc["modules_in_block_to_quantize"] = [list(quantized)]
  return qc


def _base_settings(qarrays: dict[str, QArray]) -> tuple[int, int, bool]:
  """``(bits, group_size, sym)`` most of the decoder-layer QArrays share (by element count): the base config of
  a mixed export, the others becoming ``dynamic`` overrides. Symmetric only when every such QArray is."""
  weight: dict[tuple[int, int], int] = {}
  decoder = [w for p, w in qarrays.items() if any(re.fullmatch(d, p) for d in DECODER_LINEARS)] \
      or list(qarrays.values())
  for w in decoder:
    key = (w.bits, -1 if _group(w.shape[1], w.group_size) == w.shape[1] else w.group_size)
    weight[key] = weight.get(key, 0) + w.size
  bits, group_size = max(weight, key=lambda k: (weight[k], k))
  return bits, group_size, all(w.sym for w in decoder)


def export_gptq(dest, params, *, source_dir, bits: int | None = None, group_size: int | None = None,
                sym: bool | None = None, desc_act: bool | None = None, overwrite: bool = False,
                extra_config: dict | None = None) -> dict:
  """Writes ``params`` as an HF GPTQ folder at ``dest`` atomically (``config.json`` and ``quantize_config.json``
  with the quantization config, ``model.safetensors``, tokenizer files from ``source_dir``).

  ``bits``, ``group_size``, ``sym``: the base config (default: what most decoder-layer QArrays hold); a QArray with
  other bits, group size or (under a symmetric base) asymmetric codes gets a per-module ``dynamic`` override, so a
  mixed-precision recipe exports whole. ``desc_act`` (default: whether any QArray stores a column permutation).
  Returns ``{"path", "quantized": [HF module], "excluded": [HF module], "reasons": {module: why},
  "overrides": {module: settings}, ...}``.
  """
  source_dir = Path(source_dir)
  flat = tree.flatten(params)
  qarrays = {p: v for p, v in flat.items() if isinstance(v, QArray)}
  if not qarrays:
    raise InputError("no weight can be written in the GPTQ format: the parameters hold no quantized weight")
  base = _base_settings(qarrays)
  bits, group_size, sym = (base[0] if bits is None else bits, base[1] if group_size is None else group_size,
                           base[2] if sym is None else sym)
  desc_act = any(w.perm is not None for w in qarrays.values()) if desc_act is None else desc_act
  if bits not in BITS:
    raise InputError(f"GPTQ export supports bits {BITS}, got {bits}")
  if group_size != -1 and group_size < 1:
    raise InputError(f"GPTQ group size must be -1 or positive, got {group_size}")
  dest = checkpoint.check_destination(dest, overwrite).resolve()
  if dest == source_dir.resolve():
    raise InputError(f"GPTQ export destination {dest} is the source model folder")
  config = json.loads((source_dir / "config.json").read_text())
  half = np.dtype(jnp.bfloat16) if (config.get("torch_dtype") or config.get("dtype")) == "bfloat16" \
      else np.dtype(np.float16)
  tensors, quantized, reasons, overrides, widths = {}, [], {}, {}, set()
  for path, leaf in flat.items():
    name = path_to_hf(path)
    if not isinstance(leaf, QArray):
      tensors[name] = _half(np.asarray(leaf), half)
      continue
    widths.add(leaf.shape[1])
    module = name.removesuffix(".weight")
    own = _module_settings(leaf, bits, group_size, sym)
    why = (f"{leaf.bits}-bit codes (the format stores {', '.join(map(str, BITS))} bits)" if leaf.bits not in BITS
           else unsupported_reason(path, leaf, bits=own[0], group_size=own[1], sym=own[2], desc_act=desc_act))
    if why is None:
      tensors.update({f"{module}.{k}": v for k, v in gptq_tensors(leaf).items()})
      quantized.append(module)
      if own != (bits, group_size, sym):
        overrides[module] = dict(zip(("bits", "group_size", "sym"), own))
    else:
      tensors[name] = _half(np.asarray(leaf.dequantize()), half)
      reasons[module] = why
  if not quantized:
    raise InputError(f"no weight can be written in the GPTQ format (bits={bits}, group_size={group_size}): "
                     f"{reasons}")
  quantized, excluded = sorted(quantized), sorted(reasons)
  config["quantization_config"] = quantization_config(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                                                      quantized=quantized, excluded=excluded,
                                                      extra_config=extra_config, overrides=overrides)
  with checkpoint.atomic_dir(dest) as tmp:
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "quantize_config.json").write_text(json.dumps(config["quantization_config"], indent=2) + "\n")
    checkpoint.copy_tokenizer(source_dir, tmp)
  nbytes = sum(a.nbytes for a in tensors.values())
  fp16_bytes = 2 * sum(int(np.prod(v.shape)) for v in flat.values())
  return {"path": str(dest), "quantized": quantized, "excluded": excluded, "reasons": reasons,
          "overrides": overrides, "dense_dtype": half.name, "bytes": nbytes, "fp16_bytes": fp16_bytes,
          "fitting_group_sizes": fitting_group_sizes(widths)}


def _module_settings(w: QArray, bits: int, group_size: int, sym: bool) -> tuple[int, int, bool]:
  """The ``(bits, group_size, sym)`` the module ``w`` is written under: the base where its codes fit it (the
  group size compared as columns per group), else its own."""
  n = w.shape[1]
  own_group = group_size if _group(n, w.group_size) == _group(n, group_size) else w.group_size
  return w.bits, own_group, sym and w.sym


def _half(a: np.ndarray, half: np.dtype) -> np.ndarray:
  """Floating tensors in the checkpoint's half-precision type (the format's loaders compute in it)."""
  return a.astype(half) if np.issubdtype(a.dtype, np.floating) or a.dtype == jnp.bfloat16 else a


def fitting_group_sizes(widths) -> list[int]:
  """Group sizes (multiples of 16) that divide every input width in ``widths``, so no linear is kept dense."""
  g = math.gcd(*widths) if widths else 0
  return [d for d in range(16, g + 1, 16) if g % d == 0]


def summary_lines(export: dict) -> list[str]:
  """The export's summary for a terminal: one line of counts and reasons, and a warning when the export is not
  smaller than the fp16 model."""
  from collections import Counter
  n_q, n_d = len(export["quantized"]), len(export["excluded"])
  line = f"HF GPTQ export: {export['path']}: {n_q} of {n_q + n_d} linears quantized"
  if export.get("overrides"):
    kinds = Counter(f"W{o['bits']} g{o['group_size']}" for o in export["overrides"].values())
    line += f" ({len(export['overrides'])} by per-module dynamic rules: " + \
        ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())) + ")"
  if n_d:
    why = "; ".join(f"{r}: {n}" for r, n in Counter(export["reasons"].values()).most_common())
    fits = ", ".join(map(str, export["fitting_group_sizes"])) or "none"
    line += (f", {n_d} kept dense in {export['dense_dtype']} ({why}); group sizes that fit every input width: "
             f"{fits} (or -1, per channel)")
  lines = [line]
  if export["bytes"] >= export["fp16_bytes"]:
    lines.append(f"warning: the export ({export['bytes'] / 2**20:,.1f} MiB) is not smaller than the fp16 model "
                 f"({export['fp16_bytes'] / 2**20:,.1f} MiB)")
  return lines


def _gptq_config(path: Path) -> dict | None:
  cfg = path / "config.json"
  if not cfg.is_file():
    return None
  qc = json.loads(cfg.read_text()).get("quantization_config") or {}
  return qc if str(qc.get("quant_method", "")).lower() == "gptq" else None


def quantization_config_of(path) -> dict | None:
  """The GPTQ ``quantization_config`` of the HF folder ``path`` (None when it is not a GPTQ checkpoint)."""
  return _gptq_config(Path(path))


def is_gptq_checkpoint(path) -> bool:
  """Whether ``path/config.json`` declares ``quantization_config.quant_method == "gptq"``."""
  return _gptq_config(Path(path)) is not None


def _module_config(qc: dict, module: str) -> tuple[int, int, bool]:
  """``(bits, group_size, sym)`` of ``module``: the base config or its first matching GPTQModel ``dynamic`` rule."""
  base = (qc["bits"], qc["group_size"], qc.get("sym", True))
  for pattern, override in (qc.get("dynamic") or {}).items():
    if pattern.startswith("-:"):
      if re.match(pattern[2:], module):
        raise InputError(f"{module} stores GPTQ tensors but the dynamic rule {pattern!r} excludes it")
    elif re.match(pattern.removeprefix("+:"), module):
      return (override.get("bits", base[0]), override.get("group_size", base[1]), override.get("sym", base[2]))
  return base


def _blocks(words: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
  """int32 ``words`` holding ``n`` codes along ``axis`` as uint32, zero-padded to whole 32-code blocks."""
  words = np.asarray(words).view(np.uint32)
  pad = [(0, 0)] * words.ndim
  pad[axis] = (0, packing.packed_length(n, bits) - words.shape[axis])
  return np.pad(words, pad)


def from_gptq_tensors(parts: dict, shape: tuple[int, int], *, bits: int, group_size: int, sym: bool, dtype: str,
                      zero_offset: int = 1, module: str = "weight") -> QArray:
  """QArray ``[out, in]`` from ``{qweight, qzeros, scales, g_idx}`` (inverse of :func:`gptq_tensors`).

  zero = stored + ``zero_offset`` (1 in the v1 format); non-sorted ``g_idx`` becomes ``perm``; scales keep their
  dtype. ``sym`` (from the config) yields a symmetric QArray only when every zero is ``2**(bits-1)``. Raises
  InputError naming ``module`` when the tensors do not fit ``shape`` or ``g_idx`` has unequal groups.
  """
  out, n = shape
  g = _group(n, group_size)
  ng = -(-n // g)
  if bits not in BITS or n * bits % 32 or out * bits % 32:
    raise InputError(f"{module}: {bits}-bit GPTQ cannot pack a [{out}, {n}] weight")
  want = {"qweight": (n * bits // 32, out), "qzeros": (ng, out * bits // 32), "scales": (ng, out), "g_idx": (n,)}
  for k, s in want.items():
    if tuple(parts[k].shape) != s:
      raise InputError(f"{module}.{k} has shape {tuple(parts[k].shape)}, expected {s} for a [{out}, {n}] weight "
                       f"with bits={bits}, group_size={group_size}")
  scales = np.asarray(parts["scales"])
  if not np.all(np.isfinite(scales.astype(np.float32))):
    raise InputError(f"{module}.scales contains NaN or Inf values")
  g_idx = np.asarray(parts["g_idx"]).astype(np.int64)
  natural = np.arange(n) // g
  perm = None
  if not np.array_equal(g_idx, natural):
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    if not np.array_equal(g_idx[perm], natural):
      raise InputError(f"{module}.g_idx does not put exactly {g} input rows in each group (group_size="
                       f"{group_size}); this act-order layout cannot be represented")
  # qweight.T is already a QArray codes array (bitstream along the input axis) in original column order
  codes = _blocks(parts["qweight"], bits, n, 0).T
  if perm is not None:
    codes = packing.pack(np.asarray(packing.unpack(codes, bits=bits, n=n))[:, perm], bits=bits)
  zero = np.asarray(packing.unpack(_blocks(parts["qzeros"], bits, out, 1), bits=bits, n=out)).astype(np.int32)
  zero = zero + zero_offset                                                          # [G, out]
  if zero.max() > 255:
    raise InputError(f"{module}.qzeros encodes a zero point of {zero.max()}, which qjax cannot store")
  is_sym = bool(sym) and bool(np.all(zero == 2 ** (bits - 1)))
  return QArray(codes=jnp.asarray(codes), scale=jnp.asarray(np.ascontiguousarray(scales.T)),
                zero=None if is_sym else jnp.asarray(np.ascontiguousarray(zero.T.astype(np.uint8))),
                perm=None if perm is None else jnp.asarray(perm), shape=(out, n), bits=bits,
                group_size=group_size, sym=is_sym, dtype=jnp.dtype(dtype).name)


def load_gptq_params(path, expected_shapes: dict[str, tuple], dtype: str, tied: bool) -> dict:
  """Parameter pytree of an HF GPTQ folder: QArrays for ``<module>.qweight`` linears, the rest as in
  :func:`qjax.io.safetensors.load_params` (dense tensors cast to ``dtype``; scales keep their stored dtype)."""
  path = Path(path)
  qc = _gptq_config(path)
  if qc is None or "bits" not in qc or "group_size" not in qc:
    raise InputError(f"{path}/config.json has no GPTQ quantization_config with bits and group_size")
  fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
  if fmt not in FORMATS or qc.get("is_marlin_format"):
    raise InputError(f"{path}: GPTQ checkpoint_format {fmt!r} is not supported (only {', '.join(FORMATS)})")
  tensors = hf.read_tensors(path)
  flat = {}
  for module in sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")):
    missing = [f"{module}.{k}" for k in _PARTS if f"{module}.{k}" not in tensors]
    if missing:
      raise InputError(f"GPTQ checkpoint {path} lacks {', '.join(missing)}")
    parts = {k: tensors.pop(f"{module}.{k}") for k in _PARTS}
    p = hf_to_path(f"{module}.weight")
    if p not in expected_shapes:
      raise InputError(f"GPTQ checkpoint {path} quantizes {module}, which its config does not have")
    try:
      bits, group_size, sym = _module_config(qc, module)
      flat[p] = from_gptq_tensors(parts, expected_shapes[p], bits=bits, group_size=group_size, sym=sym, dtype=dtype,
                                  zero_offset=FORMATS[fmt], module=module)
    except InputError as e:
      raise InputError(f"GPTQ checkpoint {path}: {e}") from None
  flat.update(hf.dense_params(path, tensors, tied))
  hf.check_shapes(path, flat, expected_shapes)
  dt = DTYPES[dtype]
  return tree.unflatten({p: a if isinstance(a, QArray) else jnp.asarray(a, dtype=dt) for p, a in flat.items()})
