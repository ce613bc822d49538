"""One declarative map per model family: where the decoder layers live, the names of their linears, which norm
feeds which linears, the true-sequential quantization order and where RoPE applies.

Parameter paths mirror the Hugging Face state-dict names with ``layers.N`` written ``layers_N`` and ``.`` written
``/`` (``model.layers.0.self_attn.q_proj.weight`` -> ``model/layers_0/self_attn/q_proj/weight``); linear weights
keep the HF ``[out_features, in_features]`` layout.
"""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  layers_prefix: str                            # decoder layer i lives at f"{layers_prefix}_{i}"
  linears: tuple[tuple[str, str], ...]           # (role, path inside a layer), in execution order
  norm_feeds: tuple[tuple[str, tuple[str, ...]], ...]  # (norm path inside a layer, roles it feeds)
  # (first role, second role, condition): the first linear's output rows feed the second's input columns one to
  # one (per-channel scales fold between them) when the condition holds: "" always, "mha" without grouped-query
  # attention (with GQA one value row feeds several heads' columns), "relu" with a ReLU activation (positively
  # homogeneous; GELU/SiLU between them is not)
  linear_feeds: tuple[tuple[str, str, str], ...]
  sequential: tuple[tuple[str, ...], ...]        # true-sequential groups of roles
  rope_roles: tuple[str, ...]                    # projections whose outputs get RoPE
  embed: str
  final_norm: str
  lm_head: str = "lm_head/weight"
  # GGUF (llama.cpp) spelling, None when llama.cpp has no such architecture: ``general.architecture``, the
  # (parameter path, tensor name) pairs outside the layers and inside layer i (tensor names then start "blk.i.").
  # llama.cpp stores the rows of the ``rope_roles`` projections permuted (see qjax.io.gguf_load).
  gguf_arch: str | None = None
  gguf_names: tuple[tuple[str, str], ...] = ()
  gguf_layer_names: tuple[tuple[str, str], ...] = ()
  # Tensor parallelism (qjax.models.sharding): the roles whose output features split over the mesh's "model" axis
  # (their outputs stay split: attention heads, FFN channels) and those whose input features do (they consume the
  # split activations; their partial sums are all-reduced), Megatron's column- and row-parallel linears.
  split_out: tuple[str, ...] = ()
  split_in: tuple[str, ...] = ()

  def layer_path(self, i: int) -> str:
    return f"{self.layers_prefix}_{i}"

  def in_layer(self, path: str) -> bool:
    """Whether the parameter ``path`` belongs to a decoder layer."""
    head, sep, rest = path.partition(self.layers_prefix + "_")
    return not head and bool(sep) and rest.split("/", 1)[0].isdigit()

  def linear_path(self, role: str) -> str:
    return dict(self.linears)[role]

  def foldable_linear_pairs(self, config) -> tuple[tuple[str, str], ...]:
    """The ``linear_feeds`` pairs ``(first, second)`` (roles) whose condition holds for ``config``."""
    ok = {"": True, "mha": config.num_kv_heads == config.num_heads, "relu": config.hidden_act == "relu"}
    return tuple((a, b) for a, b, cond in self.linear_feeds if ok[cond])

  def gguf_map(self, num_layers: int) -> dict[str, str]:
    """``{parameter path: GGUF tensor name}`` of a model with ``num_layers`` layers (every name the family knows;
    a model holds a subset, e.g. no ``lm_head`` when tied, no biases)."""
    out = dict(self.gguf_names)
    for i in range(num_layers):
      out.update({f"{self.layer_path(i)}/{p}": f"blk.{i}.{g}" for p, g in self.gguf_layer_names})
    return out

  @property
  def linear_pattern(self) -> str:
    """Regex (full match) of every decoder linear weight of this family."""
    alts = "|".join(re.escape(p) for _, p in self.linears)
    return rf"{re.escape(self.layers_prefix)}_\d+/({alts})/weight"


LLAMA = Family(
    name="llama",
    layers_prefix="model/layers",
    linears=(("q", "self_attn/q_proj"), ("k", "self_attn/k_proj"), ("v", "self_attn/v_proj"),
             ("o", "self_attn/o_proj"), ("gate", "mlp/gate_proj"), ("up", "mlp/up_proj"),
             ("down", "mlp/down_proj")),
    norm_feeds=(("input_layernorm", ("q", "k", "v")), ("post_attention_layernorm", ("gate", "up"))),
    linear_feeds=(("v", "o", "mha"), ("up", "down", "")),
    sequential=(("q", "k", "v"), ("o",), ("gate", "up"), ("down",)),
    rope_roles=("q", "k"),
    split_out=("q", "k", "v", "gate", "up"),
    split_in=("o", "down"),
    embed="model/embed_tokens/weight",
    final_norm="model/norm",
    gguf_arch="llama",
    gguf_names=(("model/embed_tokens/weight", "token_embd.weight"), ("model/norm/weight", "output_norm.weight"),
                ("lm_head/weight", "output.weight")),
    gguf_layer_names=(("input_layernorm/weight", "attn_norm.weight"),
                      ("post_attention_layernorm/weight", "ffn_norm.weight"),
                      *((f"{path}/{kind}", f"{gg}.{kind}") for path, gg in (
                          ("self_attn/q_proj", "attn_q"), ("self_attn/k_proj", "attn_k"),
                          ("self_attn/v_proj", "attn_v"), ("self_attn/o_proj", "attn_output"),
                          ("mlp/gate_proj", "ffn_gate"), ("mlp/up_proj", "ffn_up"), ("mlp/down_proj", "ffn_down"))
                        for kind in ("weight", "bias"))),
)

OPT = Family(
    name="opt",
    layers_prefix="model/decoder/layers",
    linears=(("q", "self_attn/q_proj"), ("k", "self_attn/k_proj"), ("v", "self_attn/v_proj"),
             ("o", "self_attn/out_proj"), ("fc1", "fc1"), ("fc2", "fc2")),
    norm_feeds=(("self_attn_layer_norm", ("q", "k", "v")), ("final_layer_norm", ("fc1",))),
    linear_feeds=(("v", "o", "mha"), ("fc1", "fc2", "relu")),
    sequential=(("q", "k", "v"), ("o",), ("fc1",), ("fc2",)),
    rope_roles=(),
    split_out=("q", "k", "v", "fc1"),
    split_in=("o", "fc2"),
    embed="model/decoder/embed_tokens/weight",
    final_norm="model/decoder/final_layer_norm",
)

FAMILIES = {"llama": LLAMA, "opt": OPT}

# Every decoder linear of every family: the default target of weight quantization.
DECODER_LINEARS = tuple(f.linear_pattern for f in FAMILIES.values())

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def hf_to_path(key: str) -> str:
  """HF state-dict key -> qjax parameter path."""
  if key.startswith("decoder."):  # old OPT checkpoints without the "model." prefix
    key = "model." + key
  return _LAYER_RE.sub(r".layers_\1.", key).replace(".", "/")


def path_to_hf(path: str) -> str:
  """qjax parameter path -> HF state-dict key."""
  return re.sub(r"/layers_(\d+)/", r"/layers/\1/", path).replace("/", ".")
