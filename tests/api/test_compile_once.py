"""Evaluating the same quantized model twice compiles its forward once: hooks compare by value, and the compiled
perplexity step is cached by (model, parameter signature, batch shape)."""
from __future__ import annotations

import jax
import numpy as np

from qjax.evaluation import perplexity
from qjax.methods.activations.quantizers import ActQuantConfig
from qjax.methods.kv import kivi
from qjax.methods.weights import rtn
from qjax.io.hf import load_model

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)


def test_second_evaluation_compiles_nothing(llama_dir):
  model, params = load_model(llama_dir)
  q = rtn.quantize(params, rtn.RTNConfig(bits=4, group_size=32), progress=False)[0]
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 3 * 32).astype(np.int32)

  def quantized_model():  # built anew each time, as a second run of the same recipe would
    hooks = ActQuantConfig(bits=8).hooks()
    hooks = type(hooks)(**{**vars(hooks), "kv_past": kivi.past_hook(kivi.KIVIConfig(bits=2, group_size=8,
                                                                                       residual=8))})
    return model.with_hooks(hooks)

  first = perplexity.perplexity(quantized_model(), q, tokens, 32, progress=False)
  before = len(_COMPILES)
  second = perplexity.perplexity(quantized_model(), q, tokens, 32, progress=False)
  assert len(_COMPILES) == before, "the second evaluation compiled again"
  assert second.ppl == first.ppl
  # A different recipe (other activation bits) does compile: the counter sees compilations.
  other = model.with_hooks(ActQuantConfig(bits=6).hooks())
  perplexity.perplexity(other, q, tokens, 32, progress=False)
  assert len(_COMPILES) > before


def test_compile_time_counts_compilation_only():
  """``core.timing.compile_time`` sees a first jit call compile and a second, cached one not."""
  import jax.numpy as jnp

  from qjax.core import timing
  f = jax.jit(lambda x: jnp.sin(x) * 3 + 1)
  x = jnp.arange(7.0)
  with timing.compile_time() as first:
    jax.block_until_ready(f(x))
  with timing.compile_time() as second:
    jax.block_until_ready(f(x))
  assert first.seconds > 0 and second.seconds == 0
