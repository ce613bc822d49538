"""Command-line options declared beside the config fields they set.

A method's config declares its flags in the field metadata (``option(default, Flag("--wbits", "..."))``), so
adding a method is one module: :mod:`qjax.cli.options` turns the registered config types into argparse flags,
the "flag without effect" checks and the config instance, and each config's ``__post_init__`` stays the only
validation. No argparse here: this is plain data the library layers may hold.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Flag:
  """One command-line flag setting one config field.

  ``name``: the spelling (``"--wbits"``; the argparse destination is the name without dashes, ``wbits``);
  ``parse``: text -> value (default: the field's type; booleans become ``--x/--no-x``); ``negate``: a boolean
  flag that sets the field to False (``--kv-uniform`` -> ``nuq=False``); ``requires``: a boolean field of the same
  config that must be true for the flag to have an effect (``--lkd-steps`` needs ``lkd``); ``external``: the flag
  belongs to another part of the command line (``--abits``, ``--seed``), which declares it; the config only reads
  it when the user gives it."""
  name: str
  help: str = ""
  parse: Callable[[str], object] | None = None
  negate: bool = False
  requires: str | None = None
  external: bool = False

  @property
  def dest(self) -> str:
    return self.name.lstrip("-").replace("-", "_")


def option(default, flag: Flag):
  """A dataclass field with ``default`` that ``flag`` sets from the command line."""
  return dataclasses.field(default=default, metadata={"flag": flag})


def flags(config_type) -> dict[str, Flag]:
  """``{field name: Flag}`` of a config class, in field order."""
  return {f.name: f.metadata["flag"] for f in dataclasses.fields(config_type) if "flag" in f.metadata}


def int_list(text: str) -> tuple[int, ...]:
  """``"0,-1"`` -> ``(0, -1)``: comma-separated integers (a flag's ``parse``)."""
  try:
    return tuple(int(t) for t in text.split(","))
  except ValueError:
    raise ValueError(f"expected comma-separated integers, got {text!r}") from None
