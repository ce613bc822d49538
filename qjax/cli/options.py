"""argparse from the flags the registered configs declare beside their fields (:mod:`qjax.core.options`): one
flag per spelling however many methods read it, grouped by the methods that read it; its help lists each
method's default (the config's own); a config is built from the flags the user gave, everything else keeping the
config's default, and its ``__post_init__`` is the only check of the values."""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing

from qjax.core.errors import InputError
from qjax.core.options import Flag, flags


@dataclasses.dataclass(frozen=True)
class _Use:
  method: str
  field: str
  default: object
  type: object


def _fields(cls, defaults=None):
  """``(field path, Flag, default, type hint)`` of every flag of config type ``cls``, in field order, including the
  flags of a nested config field (a QAT method's ``train``: path ``("train", "steps")``, its default taken from
  the outer config's default instance)."""
  hints = typing.get_type_hints(cls)
  fields = flags(cls)
  for f in dataclasses.fields(cls):
    default = f.default if defaults is None else getattr(defaults, f.name)
    if f.name in fields:
      yield (f.name,), fields[f.name], default, hints[f.name]
    elif dataclasses.is_dataclass(hints[f.name]) and flags(hints[f.name]):
      for path, fl, d, hint in _fields(hints[f.name], default):
        yield (f.name, *path), fl, d, hint


def _table(configs: dict[str, type]) -> dict[str, tuple[Flag, list[_Use]]]:
  """``{flag name: (Flag, [uses])}`` over ``{method name: config type}``, in declaration order."""
  table: dict[str, tuple[Flag, list[_Use]]] = {}
  for method, cls in configs.items():
    for path, fl, default, hint in _fields(cls):
      if fl.external:
        continue
      known, uses = table.setdefault(fl.name, (fl, []))
      if known != fl:
        raise ValueError(f"{fl.name} is declared twice with different settings ({method}.{'.'.join(path)}): share "
                         f"one Flag")
      uses.append(_Use(method, ".".join(path), default, hint))
  return table


def _scalar(hint):
  """``int | None`` -> ``int``."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return next(a for a in typing.get_args(hint) if a is not type(None))
  return hint


def _show(v) -> str:
  if isinstance(v, bool):
    return "on" if v else "off"
  return "inf" if isinstance(v, float) and math.isinf(v) else str(v)


def _defaults_text(fl: Flag, uses: list[_Use]) -> str:
  shown = [(u.method, u.default) for u in uses if u.default is not None]
  if fl.negate or not shown:
    return ""
  if len({_show(d) for _, d in shown}) == 1:
    return f" (default {_show(shown[0][1])})"
  return " (default: " + ", ".join(f"{m} {_show(d)}" for m, d in shown) + ")"


def add_flags(parser: argparse.ArgumentParser, configs: dict[str, type], selector: str):
  """Adds every flag the config types of ``configs`` (``{method name: config type}``) declare, in one argument
  group per set of methods reading it (titled ``selector`` and their names, e.g. ``--method gptq, spqr``). All
  default to None: a flag not given leaves the config's default."""
  groups = {}
  for fl, uses in _table(configs).values():
    names = tuple(dict.fromkeys(u.method for u in uses))
    if names not in groups:
      groups[names] = parser.add_argument_group(f"{selector} {', '.join(names)}")
    kind = _scalar(uses[0].type)
    kw = dict(dest=fl.dest, default=None, help=fl.help + _defaults_text(fl, uses))
    if fl.negate:
      kw.update(action="store_const", const=False)
    elif kind is bool and fl.parse is None:
      kw.update(action=argparse.BooleanOptionalAction)
    else:
      kw.update(type=fl.parse or kind, metavar=fl.dest.split("_")[-1].upper())
    groups[names].add_argument(fl.name, **kw)


def given_values(config_type, args, given: frozenset[str]) -> dict:
  """``{field: value}`` of the flags of ``config_type`` the user gave (``given``: destinations set); a nested
  config field with any flag given is its default instance with those fields replaced."""
  out, nested = {}, {}
  for path, fl, _, _ in _fields(config_type):
    if fl.dest in given:
      if len(path) == 1:
        out[path[0]] = getattr(args, fl.dest)
      else:
        nested.setdefault(path[0], {})[path[1]] = getattr(args, fl.dest)
  defaults = {f.name: f.default for f in dataclasses.fields(config_type)}
  return {**out, **{k: dataclasses.replace(defaults[k], **v) for k, v in nested.items()}}


def build(config_type, args, given: frozenset[str]):
  """``config_type`` with the given flags' values over its defaults. Its own checks raise; the one-line error
  then names the flags given (``... got 9 (given: --wbits 9)``)."""
  try:
    return config_type(**given_values(config_type, args, given))
  except (InputError, ValueError) as e:
    shown = " ".join(f"{fl.name} {_show(getattr(args, fl.dest))}" for _, fl, _, _ in _fields(config_type)
                     if fl.dest in given)
    raise InputError(f"{e} (given: {shown})" if shown else str(e)) from None


def scopes(configs: dict[str, type], selected: str | None, config, selector: str):
  """``(dests, applies, needs)`` for :func:`qjax.cli.common.check_scopes`: a flag applies when the selected
  method's config declares it (and its ``requires`` field is true in ``config``)."""
  out = []
  for fl, uses in _table(configs).values():
    names = list(dict.fromkeys(u.method for u in uses))
    applies = selected in names and (fl.requires is None or bool(getattr(config, fl.requires)))
    needs = f"{selector} {' or '.join(names)}"
    if fl.requires:
      needs += " with " + flags(configs[names[0]])[fl.requires].name
    out.append(((fl.dest,), applies, needs))
  return out
