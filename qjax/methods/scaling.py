"""Function-preserving per-channel rescaling of a decoder layer, shared by SmoothQuant, AWQ and the outlier
test bed.

For a norm feeding linears (the family's ``norm_feeds`` map: LLaMA ``input_layernorm -> q, k, v``,
``post_attention_layernorm -> gate, up``; OPT ``self_attn_layer_norm -> q, k, v``, ``final_layer_norm -> fc1``)
and a positive vector ``s [hidden]``::

    norm.weight /= s;  norm.bias /= s;  W[:, j] *= s_j   for every fed linear W [out, in]

so that ``W (norm(x) / s)^T`` is unchanged. Between two linears (AWQ's ``v -> o`` and ``up -> down``) the
first one's output rows (and bias) are divided by ``s`` and the second's input columns multiplied by it.
Functions take and return one layer's parameter tree (paths relative to the layer); inputs are not modified.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.core import tree
from qjax.core.errors import InputError
from qjax.models.families import Family


def check_foldable(config) -> None:
  """Rejects post-LN blocks (OPT-350m), where the norms do not feed the linears and folding would change the
  function."""
  if not config.do_layer_norm_before:
    raise InputError("this model normalizes after the residual sum (post-LN OPT): its norms do not feed the "
                     "linears, so scales cannot be folded into them")
  if not config.layer_norm_affine:
    raise InputError("this model's layer norms have no weights (layer_norm_elementwise_affine=False): scales "
                     "cannot be folded into them")


def _scaled(flat: dict, path: str, factor: jax.Array, axis: int) -> None:
  w = flat[path]
  shape = [1] * w.ndim
  shape[axis] = -1
  flat[path] = (w.astype(jnp.float32) * factor.reshape(shape)).astype(w.dtype)


def fold_into_norm(layer: dict, family: Family, norm: str, s: jax.Array) -> dict:
  """Divides ``norm`` (weight, bias) by ``s [hidden]`` and multiplies the input columns of the linears it
  feeds by ``s``."""
  flat = tree.flatten(layer)
  s = jnp.asarray(s, jnp.float32)
  for suffix in ("weight", "bias"):
    if f"{norm}/{suffix}" in flat:
      _scaled(flat, f"{norm}/{suffix}", 1.0 / s, 0)
  for role in dict(family.norm_feeds)[norm]:
    _scaled(flat, f"{family.linear_path(role)}/weight", s, 1)
  return tree.unflatten(flat)


def fold_between_linears(layer: dict, first: str, second: str, s: jax.Array) -> dict:
  """Divides the output rows (and bias) of linear ``first`` by ``s`` and multiplies the input columns of
  ``second`` by ``s`` (paths of the linears relative to the layer, e.g. ``mlp/up_proj``)."""
  flat = tree.flatten(layer)
  s = jnp.asarray(s, jnp.float32)
  _scaled(flat, f"{first}/weight", 1.0 / s, 0)
  if f"{first}/bias" in flat:
    _scaled(flat, f"{first}/bias", 1.0 / s, 0)
  _scaled(flat, f"{second}/weight", s, 1)
  return tree.unflatten(flat)


def map_layers(params, family: Family, num_layers: int, fn) -> dict:
  """A new tree with decoder layer ``i`` replaced by ``fn(i, layer_params)`` (paths relative to the layer)."""
  flat = tree.flatten(params)
  for i in range(num_layers):
    prefix = family.layer_path(i) + "/"
    layer = tree.unflatten({p[len(prefix):]: v for p, v in flat.items() if p.startswith(prefix)})
    for p, v in tree.flatten(fn(i, layer)).items():
      flat[prefix + p] = v
  return tree.unflatten(flat)
