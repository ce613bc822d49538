"""GGUF files (llama.cpp's format, read with the ``gguf`` package) -> ``(CausalLM, params)``.

The architecture comes from the ``<arch>.*`` metadata (only families whose map in :mod:`qjax.models.families`
names a ``gguf_arch``: LLaMA), turned into the HF ``config.json`` dict :class:`qjax.models.ModelConfig` parses;
tensors are named by the family's GGUF map. Every tensor type ``gguf.quants.dequantize`` knows (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants, ...) is read as float, one tensor at a time from the memory-mapped file
(peak host memory: the float model plus one tensor). llama.cpp's converter stores the rows of the RoPE projections
(q and k) interleaved per head; :func:`unpermute` restores the HF order (transformers does the same). A model
without ``output.weight`` ties its embeddings.

The tokenizer (and chat template) come from the GGUF metadata through transformers' GGUF conversion, which takes
seconds, so :func:`hf_view` keeps the converted tokenizer, the derived ``config.json`` and the raw ``tokenizer.*``
metadata (``gguf_tokenizer.json``, which checkpoints copy, so a GGUF export of a checkpoint writes the source's
tokenizer back unchanged) in a cache folder (``$QJAX_CACHE``, default ``~/.cache/qjax``, keyed by the file's size
and leading bytes): the folder the rest of qjax reads a model's config and tokenizer from (saving, HF GPTQ
export). The GGUF file itself is only read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from qjax.core import tree
from qjax.core.deferred import Deferred
from qjax.core.errors import InputError
from qjax.io import checkpoint
from qjax.models import CausalLM, ModelConfig
from qjax.models.config import DTYPES
from qjax.models.families import FAMILIES

ARCHS = {f.gguf_arch: f for f in FAMILIES.values() if f.gguf_arch}
_VIEW_VERSION = 2  # bump when the cached view's contents change


def is_gguf(path) -> bool:
  """Whether ``path`` is a file that starts with the GGUF magic."""
  path = Path(path)
  if not path.is_file():
    return False
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def open_reader(path):
  """A ``gguf.GGUFReader`` on ``path`` (memory-mapped, read-only); a damaged or truncated file is an InputError."""
  import gguf
  path = Path(path)
  if not path.is_file():
    raise InputError(f"GGUF file {path} does not exist")
  try:
    return gguf.GGUFReader(path, "r")
  except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise InputError(f"cannot read {path}: damaged or truncated GGUF file ({first})") from None


def metadata(reader, key: str, default=None):
  """The value of metadata ``key`` (strings, numbers, arrays as lists), or ``default``."""
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def hf_config(reader, path="GGUF file") -> dict:
  """The HF ``config.json`` dict of the GGUF's architecture (LLaMA family)."""
  arch = metadata(reader, "general.architecture")
  if arch not in ARCHS:
    raise InputError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(ARCHS))})")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise InputError(f"{path}: per-dimension RoPE frequencies (rope_freqs, llama3 scaling) are not supported")

  def need(key):
    v = metadata(reader, f"{arch}.{key}")
    if v is None:
      raise InputError(f"{path}: GGUF metadata lacks {arch}.{key}")
    return v

  heads, hidden = int(need("attention.head_count")), int(need("embedding_length"))
  tokens = metadata(reader, "tokenizer.ggml.tokens")
  embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  vocab = metadata(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None) or (
      int(embd.shape[1]) if embd is not None else None)
  rope = {}
  if metadata(reader, f"{arch}.rope.scaling.type") == "linear":
    rope = {"rope_type": "linear", "factor": float(metadata(reader, f"{arch}.rope.scaling.factor"))}
  elif metadata(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
    raise InputError(f"{path}: RoPE scaling {metadata(reader, f'{arch}.rope.scaling.type')!r} is not supported")
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": arch, "vocab_size": int(vocab),
      "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
      "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
      "num_key_value_heads": int(metadata(reader, f"{arch}.attention.head_count_kv", heads)),
      "head_dim": int(metadata(reader, f"{arch}.attention.key_length", hidden // heads)),
      "max_position_embeddings": int(need("context_length")),
      "rms_norm_eps": float(metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(metadata(reader, f"{arch}.rope.freq_base", 10000.0)), "rope_scaling": rope or None,
      "hidden_act": "silu", "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": "blk.0.ffn_up.bias" in names,
      "bos_token_id": metadata(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": metadata(reader, "tokenizer.ggml.eos_token_id"), "torch_dtype": "float32",
  }


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's row order of a RoPE projection ``w [n_head * d, ...]``: within each head, the rows of the two
  rotated halves interleaved (row ``2j`` = HF row ``j``, row ``2j+1`` = HF row ``j + d/2``)."""
  d = w.shape[0] // n_head
  return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """The inverse of :func:`permute`: HF row order from llama.cpp's."""
  d = w.shape[0] // n_head
  return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_heads(model: CausalLM) -> dict[str, int]:
  """``{parameter path: heads}`` of the projections llama.cpp stores permuted (q: query heads, k: KV heads)."""
  fam, c = model.family, model.config
  heads = {"q": c.num_heads, "k": c.num_kv_heads}
  return {f"{fam.layer_path(i)}/{fam.linear_path(r)}/{kind}": heads[r] for i in range(c.num_layers)
          for r in fam.rope_roles for kind in ("weight", "bias")}


def load_model(path, dtype: str = "float32", *, stream: bool = False) -> tuple[CausalLM, dict]:
  """``(model, params)`` from a GGUF file, every tensor dequantized to ``dtype`` (see the module docstring).
  ``stream``: the decoder layers' tensors stay in the file as :class:`GGUFTensor` leaves, read and dequantized
  when the layer-wise calibration reaches them."""
  path = Path(path)
  reader = open_reader(path)
  model = CausalLM(ModelConfig.from_hf(hf_config(reader, path)), dtype)
  shapes = model.param_shapes()
  names = model.family.gguf_map(model.config.num_layers)
  tensors = {t.name: t for t in reader.tensors}
  wanted = {names[p]: p for p in shapes if p in names}
  unknown = sorted(set(shapes) - set(names))
  missing = sorted(n for n in wanted if n not in tensors)
  extra = sorted(set(tensors) - set(wanted))
  if unknown or missing or extra:
    raise InputError(f"{path} does not match its metadata: missing {(unknown + missing)[:3]}, unexpected "
                     f"{extra[:3]}")
  heads, flat = rope_heads(model), {}
  for name, p in wanted.items():
    t = tensors[name]
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))     # GGUF lists dimensions innermost first
    if shape != tuple(shapes[p]):
      raise InputError(f"GGUF tensor {name} in {path} has shape {shape}, its metadata implies {tuple(shapes[p])}")
    lazy = GGUFTensor(str(path), name, shape, heads.get(p), int(t.n_bytes), dtype)
    flat[p] = lazy if stream and model.family.in_layer(p) else lazy.read(t)
  return model, tree.unflatten(flat)


@dataclasses.dataclass(frozen=True)
class GGUFTensor(Deferred):
  """One tensor of a GGUF file (memory-mapped), dequantized to ``dtype`` (and its rotary heads un-permuted,
  ``heads``) only when :meth:`load` is called."""
  file: str
  name: str
  shape: tuple[int, ...]
  heads: int | None
  nbytes: int
  dtype: str = "float32"

  def load(self):
    return self.load_all([self])[0]

  @classmethod
  def load_all(cls, leaves: list) -> list:
    """Each file's header parsed once for all its ``leaves`` (one decoder layer's tensors)."""
    readers = {f: {t.name: t for t in open_reader(f).tensors} for f in dict.fromkeys(v.file for v in leaves)}
    return [v.read(readers[v.file][v.name]) for v in leaves]

  def read(self, t):
    """The dequantized array of ``t`` (this tensor's entry of an open reader)."""
    import gguf
    try:
      a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    except (ValueError, NotImplementedError, TypeError) as e:
      raise InputError(f"cannot read tensor {self.name} ({t.tensor_type.name}) of {self.file}: {e}") from None
    if a.shape != self.shape:
      raise InputError(f"GGUF tensor {self.name} in {self.file} has shape {a.shape}, its metadata implies "
                       f"{self.shape}")
    if self.heads is not None:
      a = unpermute(a, self.heads)
    if not np.all(np.isfinite(a)):
      raise InputError(f"GGUF tensor {self.name} in {self.file} contains NaN or Inf values")
    return jnp.asarray(a, dtype=DTYPES[self.dtype])


GGUF_TOKENIZER_FILE = "gguf_tokenizer.json"  # the source's tokenizer.* metadata, carried by views and checkpoints


def tokenizer_metadata(reader) -> list:
  """``[[key, value, value type, array item type or None], ...]`` of the ``tokenizer.*`` metadata (JSON-able; what
  a GGUF export writes back unchanged)."""
  return [[k, f.contents(), int(f.types[0]), int(f.types[-1]) if len(f.types) > 1 else None]
          for k, f in reader.fields.items() if k.startswith("tokenizer.")]


def cache_root() -> Path:
  return Path(os.environ.get("QJAX_CACHE") or Path.home() / ".cache" / "qjax")


def _key(path: Path) -> str:
  h = hashlib.sha256()
  h.update(f"{_VIEW_VERSION}:{path.stat().st_size}:".encode())
  with open(path, "rb") as f:
    h.update(f.read(1 << 20))  # the header, the metadata (tokenizer included) and the first tensors
  return h.hexdigest()[:24]


def hf_view(path) -> Path:
  """A folder holding the GGUF model's ``config.json`` and its tokenizer (converted by transformers from the GGUF
  metadata, chat template included), built once per file in the cache (atomically) and reused."""
  path = Path(path).resolve()
  dest = cache_root() / "gguf" / _key(path)
  if (dest / "config.json").is_file():
    return dest
  reader = open_reader(path)
  config = hf_config(reader, path)
  import transformers
  try:
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"cannot convert the tokenizer of {path}: {str(e).splitlines()[0][:200]}") from None
  if not tok.chat_template and metadata(reader, "tokenizer.chat_template"):
    tok.chat_template = metadata(reader, "tokenizer.chat_template")
  try:
    with checkpoint.atomic_dir(dest) as tmp:  # a concurrent build of the same view just replaces it
      (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
      tok.save_pretrained(str(tmp))
      (tmp / GGUF_TOKENIZER_FILE).write_text(json.dumps(tokenizer_metadata(reader)))
      (tmp / "source.json").write_text(json.dumps({"gguf": str(path)}) + "\n")
  except OSError as e:
    raise InputError(f"cannot write the GGUF view cache {dest} ({e.strerror or e}): set QJAX_CACHE to a "
                     f"writable folder") from None
  return dest
