"""qjax parameters -> a GGUF file that llama.cpp-format readers (llama.cpp, the ``gguf`` package, transformers)
load.

A linear (or embedding) QArray whose grid a GGUF block type holds is written in that type from qjax's own codes,
never re-quantized; the block types are 32 input columns each, fp16 scale ``d``:

    Q4_0  sym 4-bit,  w = d * (q - 8)           q = qjax's code (zero 8)      18 bytes: d, 16 bytes of nibbles
    Q4_1  asym 4-bit, w = d * q + m             m = fp16(-d * zero)           20 bytes: d, m, 16 bytes of nibbles
    Q8_0  sym 8-bit,  w = d * q, q int8         q = qjax's code - 128         34 bytes: d, 32 int8

(nibbles: byte j holds column j in its low and column j + 16 in its high four bits). The QArray needs groups of
32, natural column order (GPTQ with static groups qualifies; a stored act-order permutation does not), whole
groups and float16 scales. Q4_0 and Q8_0 are exact; Q4_1 stores the group minimum in fp16 (the format's), so its
weights differ from qjax's ``d * (q - zero)`` by at most half an fp16 ulp of ``d * zero``. Any other tensor is
written F16 (F32 for norms and with ``dense_type="F32"``) and a linear among them is listed with the reason.

The rows of the RoPE projections are permuted back to llama.cpp's order (:func:`qjax.io.gguf_load.permute`).
Metadata: the architecture and hyper-parameters, and the tokenizer: copied from a GGUF source, otherwise converted
from the HF folder's tokenizer (SentencePiece ``tokenizer.model`` -> ``llama``; a byte-level BPE
``tokenizer.json`` -> ``gpt2``), or refused with the reason. The file is written atomically.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from qjax.core import tree
from qjax.core.errors import InputError
from qjax.core.formats.base import is_quantized
from qjax.core.formats.qarray import QArray
from qjax.io import checkpoint, gguf_load
from qjax.models import CausalLM
from qjax.models.families import FAMILIES

BLOCK = 32


def block_type(w: QArray) -> tuple[str | None, str]:
  """``(GGUF type name, "")`` for a QArray a GGUF block type holds exactly, else ``(None, why not)``."""
  n = w.shape[1]
  if w.perm is not None:
    return None, "act-order column permutation (GGUF stores natural column order)"
  if w.group_size != BLOCK:
    return None, f"group size {w.group_size} (GGUF blocks hold 32 columns)"
  if n % BLOCK:
    return None, f"input width {n} is not a multiple of 32"
  if np.dtype(w.scale.dtype) != np.float16:
    return None, f"{np.dtype(w.scale.dtype).name} scales (GGUF blocks store float16)"
  kind = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}.get((w.bits, w.sym))
  if kind is None:
    return None, f"{w.bits}-bit {'sym' if w.sym else 'asym'} codes (GGUF: 4-bit sym/asym, 8-bit sym)"
  if kind == "Q4_1" and not np.all(np.isfinite((-np.asarray(w.scale, np.float32) * w.zero_point()).astype(
      np.float16))):
    return None, "group minimum overflows float16"
  return kind, ""


def _nibbles(q: np.ndarray) -> np.ndarray:
  """uint8 codes ``[..., 32]`` (0..15) -> ``[..., 16]`` bytes: column j low, column j + 16 high."""
  return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def blocks(w: QArray, kind: str) -> np.ndarray:
  """The raw GGUF bytes ``[out, in / 32 * block bytes]`` uint8 of a QArray :func:`block_type` accepts."""
  out, n = w.shape
  q = np.asarray(w.unpacked_codes()).reshape(out, n // BLOCK, BLOCK)
  d = np.asarray(w.scale, np.float16).reshape(out, n // BLOCK, 1)
  as_bytes = lambda a: np.ascontiguousarray(a).view(np.uint8)
  if kind == "Q4_0":
    parts = [as_bytes(d), _nibbles(q)]
  elif kind == "Q4_1":
    m = (-d.astype(np.float32) * np.asarray(w.zero_point()).reshape(out, n // BLOCK, 1)).astype(np.float16)
    parts = [as_bytes(d), as_bytes(m), _nibbles(q)]
  else:
    parts = [as_bytes(d), (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
  return np.concatenate(parts, axis=-1).reshape(out, -1)


def _permute_rows(w, heads: int):
  """``w`` (array or QArray) with its rows in llama.cpp's RoPE order."""
  if not isinstance(w, QArray):
    return gguf_load.permute(np.asarray(w), heads)
  idx = gguf_load.permute(np.arange(w.shape[0]), heads)
  take = lambda a: None if a is None else np.asarray(a)[idx]
  return dataclasses.replace(w, codes=take(w.codes), scale=take(w.scale), zero=take(w.zero))


def export_gguf(dest, params, model: CausalLM, *, source, overwrite: bool = False, dense_type: str = "F16",
                name: str | None = None) -> dict:
  """Writes ``params`` of ``model`` as a GGUF file at ``dest`` (see the module docstring); ``source``: the GGUF
  file or HF folder the model came from (its tokenizer). Returns ``{"path", "types": {tensor: GGUF type},
  "dense": {linear tensor: why}, "bytes", "fp16_bytes"}``."""
  import gguf
  fam, c = model.family, model.config
  check_exportable(c)
  if dense_type not in ("F16", "F32"):
    raise InputError(f"dense GGUF type must be F16 or F32, got {dense_type!r}")
  source = Path(source)
  dest = checkpoint.check_destination(dest, overwrite, "--export-gguf file").absolute()
  if source.exists() and dest.exists() and dest.resolve() == source.resolve():
    raise InputError(f"GGUF export destination {dest} is the source model")
  tokenizer = _tokenizer_fields(source)
  names, heads = fam.gguf_map(c.num_layers), gguf_load.rope_heads(model)
  flat = tree.flatten(params)
  types, dense, tensors = {}, {}, []
  for path, leaf in flat.items():
    if path not in names:
      raise InputError(f"no GGUF name for parameter {path}")
    tname = names[path]
    if path in heads:
      leaf = _permute_rows(leaf, heads[path])
    kind, why = block_type(leaf) if isinstance(leaf, QArray) else (None, "")
    if kind is not None:
      tensors.append((tname, blocks(leaf, kind), getattr(gguf.GGMLQuantizationType, kind)))
    else:
      if is_quantized(leaf):
        dense[tname] = why or f"{type(leaf).__name__} (no GGUF type holds it)"
      a = np.asarray(leaf.dequantize() if is_quantized(leaf) else leaf, np.float32)
      kind = "F32" if a.ndim == 1 or dense_type == "F32" else "F16"
      tensors.append((tname, a.astype(np.float16 if kind == "F16" else np.float32), None))
    types[tname] = kind
  with checkpoint.atomic_path(dest) as tmp:
    w = gguf.GGUFWriter(tmp, fam.gguf_arch)
    _architecture(w, c, name or source.stem)
    for key, (value, vtype, sub) in tokenizer.items():
      w.add_key_value(key, value, vtype, sub_type=sub)
    for tname, data, raw in tensors:
      w.add_tensor(tname, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
  fp16 = 2 * sum(int(np.prod(v.shape)) for v in flat.values())
  return {"path": str(dest), "types": types, "dense": dense, "bytes": dest.stat().st_size, "fp16_bytes": fp16}


def check_exportable(config) -> None:
  """Raises InputError (before any long work) for an architecture GGUF export cannot write: a family without a
  GGUF spelling (OPT) or a RoPE scaling other than linear."""
  fam = FAMILIES[config.family]
  if fam.gguf_arch is None:
    raise InputError(f"GGUF export supports {', '.join(sorted(gguf_load.ARCHS))} models, not {fam.name}")
  kind = config.rope_scaling_dict.get("rope_type")
  if kind not in (None, "linear"):
    raise InputError(f"GGUF export: RoPE scaling {kind!r} is not supported (default, linear)")


def summary_line(export: dict) -> str:
  """One terminal line: tensors per GGUF type, the linears written dense and why, file size against fp16."""
  from collections import Counter
  kinds = Counter(export["types"].values())
  line = (f"GGUF export: {export['path']}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
          + f" tensors; {export['bytes'] / 2**20:,.1f} MiB (fp16 {export['fp16_bytes'] / 2**20:,.1f} MiB)")
  if export["dense"]:
    why = "; ".join(f"{r}: {n}" for r, n in Counter(export["dense"].values()).most_common())
    line += f"; {len(export['dense'])} quantized tensors written dense ({why})"
  return line


def _architecture(w, c, name: str):
  w.add_name(name)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_heads)
  w.add_head_count_kv(c.num_kv_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_rope_dimension_count(c.head_dim)
  w.add_rope_freq_base(c.rope_theta)
  w.add_layer_norm_rms_eps(c.norm_eps)
  w.add_vocab_size(c.vocab_size)
  scaling = c.rope_scaling_dict
  if scaling.get("rope_type") == "linear":  # the only scaling check_exportable lets through
    import gguf
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(scaling["factor"]))


def _tokenizer_fields(source: Path) -> dict:
  """``{key: (value, GGUFValueType, array item type)}`` of the ``tokenizer.*`` metadata to write: a GGUF
  source's (or, for a folder made from one, its ``gguf_tokenizer.json``), else converted from its HF tokenizer."""
  import gguf
  if gguf_load.is_gguf(source):
    items = gguf_load.tokenizer_metadata(gguf_load.open_reader(source))
  elif (source / gguf_load.GGUF_TOKENIZER_FILE).is_file():  # a view or a checkpoint of a GGUF model
    items = json.loads((source / gguf_load.GGUF_TOKENIZER_FILE).read_text())
  else:
    return _hf_tokenizer_fields(source)
  T = gguf.GGUFValueType
  return {k: (v, T(t), None if sub is None else T(sub)) for k, v, t, sub in items}


def _hf_tokenizer_fields(folder: Path) -> dict:
  import gguf
  T = gguf.GGUFValueType
  cfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() \
      else {}
  model_cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
  out = {}
  if (folder / "tokenizer.model").is_file():
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n = sp.get_piece_size()
    kinds = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
             else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
             else gguf.TokenType.NORMAL for i in range(n)]
    out["tokenizer.ggml.model"] = ("llama", T.STRING, None)
    out["tokenizer.ggml.tokens"] = ([sp.id_to_piece(i) for i in range(n)], T.ARRAY, T.STRING)
    out["tokenizer.ggml.scores"] = ([float(sp.get_score(i)) for i in range(n)], T.ARRAY, T.FLOAT32)
    out["tokenizer.ggml.token_type"] = ([int(k) for k in kinds], T.ARRAY, T.INT32)
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unknown": sp.unk_id(), "padding": sp.pad_id()}
    add_bos = cfg.get("add_bos_token", True)
  elif (folder / "tokenizer.json").is_file():
    tj = json.loads((folder / "tokenizer.json").read_text())
    m = tj.get("model") or {}
    if m.get("type") != "BPE":
      raise InputError(f"GGUF export: the tokenizer of {folder} is a {m.get('type')} tokenizer.json; only "
                       f"SentencePiece (tokenizer.model) and byte-level BPE convert")
    vocab = dict(m["vocab"])
    special = set()
    for t in tj.get("added_tokens", []):
      vocab[t["content"]] = t["id"]
      if t.get("special"):
        special.add(t["id"])
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for tok_, i in vocab.items():
      tokens[i] = tok_
    merges = [" ".join(x) if isinstance(x, list) else x for x in m.get("merges", [])]
    out["tokenizer.ggml.model"] = ("gpt2", T.STRING, None)
    out["tokenizer.ggml.pre"] = ("default", T.STRING, None)
    out["tokenizer.ggml.tokens"] = (tokens, T.ARRAY, T.STRING)
    out["tokenizer.ggml.token_type"] = ([int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
                                         for i in range(n)], T.ARRAY, T.INT32)
    out["tokenizer.ggml.merges"] = (merges, T.ARRAY, T.STRING)
    tid = lambda key: (vocab.get(cfg[key]) if isinstance(cfg.get(key), str)
                       else vocab.get((cfg.get(key) or {}).get("content")) if cfg.get(key) else None)
    ids = {"bos": model_cfg.get("bos_token_id", tid("bos_token")), "eos": model_cfg.get("eos_token_id",
                                                                                       tid("eos_token")),
           "unknown": tid("unk_token"), "padding": tid("pad_token")}
    add_bos = cfg.get("add_bos_token", False)
  else:
    raise InputError(f"GGUF export needs a tokenizer to convert: {folder} has neither tokenizer.model nor "
                     f"tokenizer.json")
  for key, i in ids.items():
    i = i[0] if isinstance(i, list) and i else i
    if isinstance(i, int) and i >= 0:
      out[f"tokenizer.ggml.{key}_token_id"] = (i, T.UINT32, None)
  out["tokenizer.ggml.add_bos_token"] = (bool(add_bos), T.BOOL, None)
  template = cfg.get("chat_template")
  if not template and (folder / "chat_template.jinja").is_file():
    template = (folder / "chat_template.jinja").read_text()
  if template:
    out["tokenizer.chat_template"] = (template, T.STRING, None)
  return out
