"""Per-path rules: which weight parameters a recipe's rules select, first fully matching rule wins."""
from __future__ import annotations

import re

import numpy as np

from qjax.api.recipe import Rule
from qjax.core import tree
from qjax.core.errors import InputError
from qjax.core.formats.base import is_quantized
from qjax.methods import registry
from qjax.models.families import DECODER_LINEARS


def weight_candidates(params) -> list[str]:
  """Paths a weight rule may quantize: every still-dense 2-D ``.../weight`` leaf (embeddings included; see
  :func:`match_rules` for how a rule reaches them)."""
  flat = tree.flatten(params)
  return [p for p, v in flat.items() if p.endswith("/weight") and not is_quantized(v) and np.ndim(v) == 2]


def _is_embedding(path: str) -> bool:
  return "embed" in path.rsplit("/", 2)[-2]


def _names_embeddings(pattern: str) -> bool:
  """Whether a rule names embeddings: its pattern spells ``embed`` (a catch-all such as ``.*`` does not)."""
  return "embed" in pattern


def match_rules(params, rules: tuple[Rule, ...]) -> dict[str, Rule]:
  """``{path: rule}``: the FIRST fully matching rule of every weight a rule matches (module docstring). A rule
  that matches no weight is refused (a typo would otherwise silently quantize nothing), as is a decoder-only
  method on a weight outside the decoder layers."""
  candidates = weight_candidates(params)
  regs = [re.compile(r.pattern) for r in rules]
  matched = {}
  for p in candidates:
    emb = _is_embedding(p)
    i = next((i for i, rg in enumerate(regs) if rg.fullmatch(p) and (not emb or _names_embeddings(rules[i].pattern))),
             None)
    if i is not None:
      matched[p] = rules[i]
  taken = {id(r) for r in matched.values()}
  for r in rules:
    if id(r) not in taken:
      raise InputError(f"rule {r.pattern!r} matches no weight that an earlier rule did not take (weights look like "
                       f"{candidates[0]!r})")
  decoder = [re.compile(p) for p in DECODER_LINEARS]
  for p, r in matched.items():
    if r.config is not None and registry.method_for(r.config).decoder_only and not any(
        d.fullmatch(p) for d in decoder):
      raise InputError(f"{r.method} quantizes decoder-layer linears only; {p} needs an RTN rule")
  return matched


def resolve_rules(params, rules: tuple[Rule, ...]) -> dict[str, object]:
  """``{path: config}`` of the weights that :func:`match_rules` gives a (non-None) config."""
  return {p: r.config for p, r in match_rules(params, rules).items() if r.config is not None}
