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

import importlib
from collections.abc import Callable

import jax

IMPLEMENTATIONS = ("cpu", "pallas_triton", "pallas_tpu")   # the names an implementation may register under


class NativeKernel:
  """An optional native CPU extension (``module``, built by ``setup.py``) and the XLA FFI target of its handler
  ``symbol``, registered for the CPU on first use. ``what`` names the kernel in its refusals."""

  def __init__(self, module: str, symbol: str, what: str):
    try:
      self.lib, self.import_error = importlib.import_module(module), None
    except ImportError as e:       # no compiler at install time, or a source checkout without the build
      self.lib, self.import_error = None, e
    self.symbol, self.what = symbol, what
    self._target = None

  def available(self) -> bool:
    """Whether the extension is built (importable)."""
    return self.lib is not None

  def check(self):
    """Raises NotImplementedError (the dispatcher then runs the reference) when the extension is not built or
    the backend is not the CPU."""
    if self.lib is None:
      raise NotImplementedError(f"{self.what}: the native extension is not built ({self.import_error})")
    if jax.default_backend() != "cpu":
      raise NotImplementedError(f"{self.what}: backend is {jax.default_backend()}, not cpu")

  def target(self) -> str:
    """The FFI target name for ``jax.ffi.ffi_call`` (registered on the first call)."""
    if self._target is None:
      jax.ffi.register_ffi_target(f"qjax_{self.symbol}_cpu", getattr(self.lib, self.symbol), platform="cpu")
      self._target = f"qjax_{self.symbol}_cpu"
    return self._target


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
    if name not in IMPLEMENTATIONS:
      raise ValueError(f"{self.name}: implementation names are {IMPLEMENTATIONS}, got {name!r}")

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

  def platforms(self) -> dict[str, tuple[str, ...]]:
    """``{implementation name: the platforms it runs on}`` of the registered implementations."""
    return {n: plats for n, (plats, _) in self._impls.items()}

  def implementations(self) -> tuple[str, ...]:
    """``"xla"`` and the names registered with this op."""
    return ("xla", *self._impls)

  def select(self, *args, implementation: str = "auto") -> list[tuple[str, Callable]]:
    """The ``(name, function)`` candidates for ``args``, in the order they are tried, the reference last. Any name
    of :data:`IMPLEMENTATIONS` is accepted: an op without that implementation runs its reference (a model asks for
    one implementation for all its ops)."""
    if implementation not in ("auto", "xla", *IMPLEMENTATIONS):
      raise ValueError(f"{self.name}: unknown implementation {implementation!r} "
                       f"(known: auto, xla, {', '.join(IMPLEMENTATIONS)})")
    arg = args[self.dispatch_arg]
    names = [] if implementation == "xla" else [implementation] if implementation != "auto" else [
        n for n, (plats, _) in self._impls.items() if jax.default_backend() in plats]
    out = [(n, fn) for n in names if n in self._impls and (fn := self._lookup(self._impls[n][1], arg)) is not None]
    ref = self._lookup(self._reference, arg)
    if ref is None:
      raise TypeError(f"{self.name}: no reference for {type(arg).__name__}")
    return out + [("xla", ref)]

  def path_name(self, *args, implementation: str = "auto", path_args: tuple = ()) -> str:
    """The execution path :meth:`__call__` takes for ``args`` (CLI summaries): the first candidate's
    ``fn.path(*path_args)`` that is not None (None: it cannot run at all here), or ``"<name> kernel"`` for one
    without a ``path``."""
    for name, fn in self.select(*args, implementation=implementation):
      path = fn.path(*path_args) if hasattr(fn, "path") else f"{name} kernel"
      if path is not None:
        return path
    raise AssertionError("unreachable: the reference always names its path")

  def __call__(self, *args, implementation: str = "auto", fallback: bool = True, **kwargs):
    """Runs the first applicable implementation; ``fallback=False`` (tests of a named implementation) raises its
    ``NotImplementedError`` instead of running the reference, also when the named one is not registered for the
    dispatch argument's type."""
    candidates = self.select(*args, implementation=implementation)
    if not fallback and implementation not in ("auto", "xla") and candidates[0][0] != implementation:
      raise NotImplementedError(f"{self.name}: no {implementation} implementation for "
                                f"{type(args[self.dispatch_arg]).__name__}")
    for name, fn in candidates:
      try:
        return fn(*args, **kwargs)
      except NotImplementedError:
        if name == "xla" or not fallback:
          raise
    raise AssertionError("unreachable: the reference either returns or raises")
