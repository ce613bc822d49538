"""The composable quantization API: :class:`Recipe` and :class:`Rule` (``recipe``), rule matching (``rules``) and
:func:`quantize_model` with its frozen :class:`Quantized` result (``pipeline``). Loading and saving models is
:mod:`qjax.io.quantized`; everything is also reachable from the top-level :mod:`qjax`."""
from __future__ import annotations

from qjax.api.pipeline import Quantized, RuleReport, method_record, quantize_model
from qjax.api.recipe import Recipe, Rule, dump_recipe, load_recipe
from qjax.api.rules import match_rules, resolve_rules, weight_candidates

__all__ = ["Quantized", "Recipe", "Rule", "RuleReport", "dump_recipe", "load_recipe", "match_rules", "method_record",
           "quantize_model", "resolve_rules", "weight_candidates"]
