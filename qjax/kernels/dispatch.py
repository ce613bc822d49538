"""The kernel dispatcher shared by every op folder (``qjax/kernels/<op>/``).

An op has an XLA reference (``xla.py``: the spec, always applicable) and optional implementations (``cpu.py``,
``pallas_triton.py``, ``pallas_tpu.py``) registered with the platforms they run on. ``op(*args,
implementation="auto")`` tries the current platform's implementations in registration order and falls back to
the reference when one raises ``NotImplementedError`` (an unsupported case: shape, dtype, weight type); naming an
implementation runs that one (still falling back to the reference on ``NotImplementedError``), ``"xla"`` the
reference alone. Implementations are keyed by the type of the op's dispatch argument (e.g. the weight), resolved
along its class hierarchy, so no ``isinstance`` chain grows with each new stored format.
"""
from __future__ import annotations

from collections.abc import Callable

import jax


class Op:
  """One kernel op: ``Op(name, dispatch_arg)``; ``dispatch_arg`` is the index of the argument whose type selects
  the implementation."""

  def __init__(self, name: str, dispatch_arg: int = 1):
    self.name, self.dispatch_arg = name, dispatch_arg
    self._impls: dict[str, tuple[tuple[str, ...], dict[type, Callable]]] = {}
    self._reference: dict[type, Callable] = {}

  def reference(self, *types: type):
    """Decorator: the XLA reference for arguments of ``types``."""
    def deco(fn):
      for t in types:
        self._reference[t] = fn
      return fn
    return deco

  def implementation(self, name: str, *types: type, platforms: tuple[str, ...]):
    """Decorator: implementation ``name`` for arguments of ``types``, on ``platforms`` (``cpu``, ``gpu``,
    ``tpu``)."""
    def deco(fn):
      plats, table = self._impls.setdefault(name, (tuple(platforms), {}))
      for t in types:
        table[t] = fn
      return fn
    return deco

  @staticmethod
  def _lookup(table: dict[type, Callable], arg):
    for t in type(arg).__mro__:
      if t in table:
        return table[t]
    return None

  def implementations(self) -> tuple[str, ...]:
    return ("xla", *self._impls)

  def select(self, *args, implementation: str = "auto") -> list[tuple[str, Callable]]:
    """The ``(name, function)`` candidates for ``args``, in the order they are tried, the reference last."""
    if implementation not in ("auto", *self.implementations()):
      raise ValueError(f"{self.name}: unknown implementation {implementation!r} "
                       f"(known: auto, {', '.join(self.implementations())})")
    arg = args[self.dispatch_arg]
    names = [] if implementation == "xla" else [implementation] if implementation != "auto" else [
        n for n, (plats, _) in self._impls.items() if jax.default_backend() in plats]
    out = [(n, fn) for n in names if (fn := self._lookup(self._impls[n][1], arg)) is not None]
    ref = self._lookup(self._reference, arg)
    if ref is None:
      raise TypeError(f"{self.name}: no reference for {type(arg).__name__}")
    return out + [("xla", ref)]

  def __call__(self, *args, implementation: str = "auto", fallback: bool = True, **kwargs):
    """Runs the first applicable implementation; ``fallback=False`` (tests of a named implementation) raises its
    ``NotImplementedError`` instead of running the reference."""
    for name, fn in self.select(*args, implementation=implementation):
      try:
        return fn(*args, **kwargs)
      except NotImplementedError:
        if name == "xla" or not fallback:
          raise
    raise AssertionError("unreachable: the reference either returns or raises")
