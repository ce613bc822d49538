"""``ModelConfig``: the architecture hyper-parameters qjax needs, parsed from a Hugging Face ``config.json``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp

from qjax.core.errors import InputError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}  # compute dtypes by name
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "opt")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  tie_word_embeddings: bool
  norm_eps: float = 1e-5
  # LLaMA
  rope_theta: float = 10000.0
  rope_scaling: tuple = ()  # sorted (key, value) items of the HF rope scaling dict; () = none
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  # OPT
  word_embed_proj_dim: int = 0
  do_layer_norm_before: bool = True
  final_layer_norm: bool = True
  enable_bias: bool = True
  layer_norm_affine: bool = True
  bos_token_id: int | None = None
  eos_token_id: int | tuple | None = None

  @property
  def family(self) -> str:
    return "opt" if self.model_type == "opt" else "llama"

  @property
  def rope_scaling_dict(self) -> dict:
    return dict(self.rope_scaling)

  @classmethod
  def from_hf(cls, d: dict) -> "ModelConfig":
    """Builds the config from a parsed HF ``config.json`` dict (transformers 4.x and 5.x spellings)."""
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
      raise InputError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    eos = d.get("eos_token_id")
    common = dict(model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                  num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                  max_position_embeddings=d.get("max_position_embeddings", 2048),
                  bos_token_id=d.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos)
    if mt == "opt":
      return cls(**common, intermediate_size=d["ffn_dim"], num_kv_heads=d["num_attention_heads"],
                 head_dim=d["hidden_size"] // d["num_attention_heads"],
                 tie_word_embeddings=d.get("tie_word_embeddings", True), norm_eps=1e-5,
                 hidden_act=d.get("activation_function", "relu"),
                 word_embed_proj_dim=d.get("word_embed_proj_dim") or d["hidden_size"],
                 do_layer_norm_before=d.get("do_layer_norm_before", True),
                 final_layer_norm=d.get("do_layer_norm_before", True) and not d.get("_remove_final_layer_norm", False),
                 enable_bias=d.get("enable_bias", True),
                 layer_norm_affine=d.get("layer_norm_elementwise_affine", True))
    # LLaMA family. transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x `rope_theta` + `rope_scaling`.
    rope = dict(d.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    if not rope or rope.get("rope_type", rope.get("type")) == "default":
      rope = dict(d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
      raise InputError(f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3")
    rope = {} if rope_type == "default" else {**rope, "rope_type": rope_type}
    rope.pop("type", None)
    heads = d["num_attention_heads"]
    return cls(**common, intermediate_size=d["intermediate_size"],
               num_kv_heads=d.get("num_key_value_heads") or heads,
               head_dim=d.get("head_dim") or d["hidden_size"] // heads,
               tie_word_embeddings=d.get("tie_word_embeddings", False), norm_eps=d.get("rms_norm_eps", 1e-6),
               rope_theta=float(theta), rope_scaling=tuple(sorted((k, _hashable(v)) for k, v in rope.items())),
               attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
               hidden_act=d.get("hidden_act", "silu"))

  @classmethod
  def from_dir(cls, path) -> "ModelConfig":
    path = Path(path)
    if not path.is_dir():
      raise InputError(f"model path {path} does not exist or is not a directory")
    cfg = path / "config.json"
    if not cfg.is_file():
      raise InputError(f"model path {path} has no config.json")
    try:
      d = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
      raise InputError(f"{cfg} is not valid JSON: {e}") from None
    return cls.from_hf(d)


def _hashable(v):
  return tuple(v) if isinstance(v, list) else v
