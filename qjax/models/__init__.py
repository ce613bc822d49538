"""Flax LLaMA and OPT causal LMs, their declarative family maps and KV caches.

:class:`CausalLM` is an architecture (config, compute dtype, activation hooks; no weights); reading checkpoints
into parameter pytrees is :mod:`qjax.io`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from qjax.core import tree
from qjax.kernels import dispatch
from qjax.models.config import DTYPES, SUPPORTED_MODEL_TYPES, ModelConfig
from qjax.models.families import FAMILIES, Family
from qjax.models.layers import ActivationHooks
from qjax.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from qjax.models.opt import OPTDecoderLayer, OPTForCausalLM

KERNELS = ("auto", "xla", *dispatch.IMPLEMENTATIONS)   # what ``CausalLM.kernel`` accepts
_CLASSES = {"llama": (LlamaForCausalLM, LlamaDecoderLayer), "opt": (OPTForCausalLM, OPTDecoderLayer)}

__all__ = ["CausalLM", "ModelConfig", "ActivationHooks", "DTYPES", "SUPPORTED_MODEL_TYPES"]


@dataclasses.dataclass(frozen=True)
class CausalLM:
  """A model architecture: config, compute dtype, activation hooks, the kernel implementation its ops ask for
  (``kernel``: ``"auto"``, ``"xla"`` or a name of :data:`qjax.kernels.dispatch.IMPLEMENTATIONS`, for the linears'
  ``qmatmul`` and the cache's attention) and the family's declarative map; ``mesh``: the ``(data, model)`` device
  mesh its computations are split over (:mod:`qjax.core.mesh`; None: one device), the parameters placed by
  :func:`qjax.models.sharding.shard_params`."""
  config: ModelConfig
  dtype: str = "float32"
  hooks: ActivationHooks = ActivationHooks()
  kernel: str = "auto"
  mesh: Mesh | None = None

  def __post_init__(self):
    if self.kernel not in KERNELS:
      raise ValueError(f"unknown kernel {self.kernel!r}; known: {', '.join(KERNELS)}")

  @property
  def family(self) -> Family:
    return FAMILIES[self.config.family]

  @property
  def module(self) -> nn.Module:
    return _CLASSES[self.config.family][0](self.config, self.hooks, DTYPES[self.dtype], self.kernel)

  def layer_module(self) -> nn.Module:
    """One decoder layer as a standalone module: ``apply({"params": layer_params}, x, positions, mask)``."""
    return _CLASSES[self.config.family][1](self.config, self.hooks, DTYPES[self.dtype], kernel=self.kernel)

  def apply(self, params, input_ids, attention_mask=None, positions=None, cache=None):
    """``(logits float32 [b, t, vocab], cache)``; see :class:`qjax.models.llama.LlamaForCausalLM`."""
    return self.module.apply({"params": params}, input_ids, attention_mask, positions, cache)

  def hidden(self, params, input_ids, mask=None, positions=None):
    """Final hidden states ``[b, t, head_features]`` of unpadded windows ``input_ids [b, t]`` (no cache); with a
    boolean ``mask [b, t, t]`` (a subset of the causal mask) and ``positions [b, t]``: of packed sequences."""
    return self.module.apply({"params": params}, input_ids, mask, positions, method="hidden")

  def head(self, params, x):
    """float32 logits ``[..., vocab]`` of final hidden states ``x``."""
    return self.module.apply({"params": params}, x, method="head")

  def embed(self, params, input_ids, positions):
    """Input of decoder layer 0 ``[b, t, hidden]`` for ``input_ids, positions [b, t]``."""
    return self.module.apply({"params": params}, input_ids, positions, method="embed")

  def param_shapes(self) -> dict[str, tuple]:
    """``{path: shape}`` of the parameters this architecture creates (no memory allocated)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: self.module.init(jax.random.key(0), ids))["params"]
    return {p: tuple(s.shape) for p, s in tree.flatten(shapes).items()}

  def with_hooks(self, hooks: ActivationHooks) -> "CausalLM":
    return dataclasses.replace(self, hooks=hooks)

  def with_kernel(self, kernel: str) -> "CausalLM":
    return dataclasses.replace(self, kernel=kernel)

  def with_mesh(self, mesh: Mesh | None) -> "CausalLM":
    return dataclasses.replace(self, mesh=mesh)
