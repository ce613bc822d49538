"""Where each parameter lives on a ``(data, model)`` mesh, from the family's declarative map.

For a weight ``[out, in]`` (HF layout):

* roles in ``family.split_out`` (LLaMA q/k/v/gate/up, OPT q/k/v/fc1): ``out`` over ``model``, ``in`` over
  ``data``;
* roles in ``family.split_in`` (o/down, out_proj/fc2): ``in`` over ``model``, ``out`` over ``data``;
* the token embedding and an untied ``lm_head`` ``[vocab, hidden]``: the vocabulary over ``model``, ``hidden``
  over ``data``;
* biases follow their weight's ``out`` axis; norms and everything else are replicated.

The ``data`` half is FSDP: a weight is stored split over the data-parallel devices and all-gathered where it is
used (XLA inserts the gather). Quantized tensors (``QArray`` and the other formats) get the same spec on each of
their 2-D leaves (codes, scales, zero points; 1-D leaves such as a column permutation stay whole). An axis that a
mesh axis does not divide stays unsplit (:func:`qjax.core.mesh.fit_spec`), so any model runs on any mesh; only
the memory saving shrinks.
"""
from __future__ import annotations

import jax

from qjax.core import mesh as meshlib
from qjax.core import tree
from qjax.core.deferred import is_deferred
from qjax.core.formats.base import is_quantized

_OUT, _IN = ("model", "data"), ("data", "model")


def wanted_spec(model, path: str) -> tuple:
  """The mesh axes wanted for each axis of the float parameter at ``path`` (before divisibility)."""
  fam = model.family
  if path in (fam.embed, fam.lm_head):
    return _OUT
  for roles, spec in ((fam.split_out, _OUT), (fam.split_in, _IN)):
    for r in roles:
      lin = f"/{fam.linear_path(r)}/"
      if lin in f"/{path}" and path.startswith(fam.layers_prefix):
        kind = path.rsplit("/", 1)[-1]
        if kind == "weight":
          return spec
        return spec[:1] if kind == "bias" else ()
  return ()


def _place(mesh, leaf, spec):
  return meshlib.put(leaf, mesh, meshlib.fit_spec(mesh, leaf.shape, spec[:leaf.ndim]))


def shard_params(model, params):
  """``params`` placed on ``model.mesh`` by :func:`wanted_spec` (a new tree; ``model.mesh`` None: unchanged).
  Under ``jax.distributed`` every process passes the same (host) values and keeps only its devices' shards."""
  mesh = model.mesh
  if mesh is None:
    return params
  out = {}
  for path, leaf in tree.flatten(params).items():
    spec = wanted_spec(model, path)
    if is_deferred(leaf):        # still on disk (a streaming run): placed when read
      out[path] = leaf
    elif is_quantized(leaf):
      out[path] = jax.tree.map(lambda a, s=spec: _place(mesh, a, s if a.ndim == 2 else ()), leaf)
    else:
      out[path] = _place(mesh, leaf, spec)
  return tree.unflatten(out)
