"""Which kernel path each part of a model takes (what the CLI summaries and ``eval/`` scripts report): the decoder
linears and the output head (:func:`qjax.kernels.qmatmul.path_name`), and a KV cache's attention
(:meth:`qjax.models.kv_cache.LayerCache.attention_path`)."""
from __future__ import annotations

from qjax.core import tree
from qjax.kernels.kv_attention import ATTENTION_QUANTIZERS
from qjax.kernels.qmatmul import path_name
from qjax.models.kv_cache import KVCache


def linear_paths(model, params, hook=None) -> list[str]:
  """The distinct paths of the decoder linears (``hook``: the activation quantizer of their inputs), sorted."""
  flat = tree.flatten(params)
  return sorted({path_name(flat[p], hook, model.kernel) for p in tree.matching(params, (model.family.linear_pattern,))})


def head_path(model, params) -> str:
  """The path of the output projection (``lm_head``, or the embedding when tied)."""
  flat, fam = tree.flatten(params), model.family
  return path_name(flat[fam.lm_head] if fam.lm_head in flat else flat[fam.embed], None, model.kernel)


def attention_path(model, cache_factory=None) -> str:
  """The path of decode attention through the caches ``cache_factory`` builds (default: the dense cache); with
  attention quantizers among the model's hooks (W8A8 attention, LLM-QAT's KV bits) the XLA reference runs, since
  the kernels take none."""
  if any(getattr(model.hooks, n) is not None for n in ATTENTION_QUANTIZERS):
    return "xla (attention quantizers: keys and values read back dense, then fake-quantized)"
  return (cache_factory or KVCache.dense)(model.config, 1, 2).layers[0].attention_path(model.kernel)


def kernel_paths(model, params, hook=None, cache_factory=None) -> dict:
  """``{"linears", "head", "attention"}``: the three above, the linears' paths joined by ``, ``."""
  return {"linears": ", ".join(linear_paths(model, params, hook)), "head": head_path(model, params),
          "attention": attention_path(model, cache_factory)}
