"""Compilation time of a block of work, from the durations JAX reports through :mod:`jax.monitoring` (tracing to a
jaxpr, lowering to MLIR, the backend compile), so a run can report compile time apart from compute time."""
from __future__ import annotations

import contextlib
import dataclasses

import jax

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@dataclasses.dataclass
class CompileTime:
  """Seconds spent compiling inside a :func:`compile_time` block (updated while the block runs)."""
  seconds: float = 0.0


@contextlib.contextmanager
def compile_time():
  """``with compile_time() as c: ...`` then ``c.seconds``: tracing + lowering + XLA compilation in the block (a
  listener registered for the block only; compilations by other threads meanwhile count too)."""
  c = CompileTime()

  def listen(event, secs, **_):
    if event in COMPILE_EVENTS:
      c.seconds += secs

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield c
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
