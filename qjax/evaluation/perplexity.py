"""Token-level perplexity with the GPTQ paper protocol, jit-compiled and batched."""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from qjax.core import mesh as meshlib
from qjax.core.errors import InputError
from qjax.core.progress import bar as progress_bar

PROTOCOL = ("token-level perplexity (GPTQ protocol): the whole text is tokenized once with the model's tokenizer "
            "(special tokens as it adds them by default, i.e. one BOS at the start for LLaMA/OPT), cut into "
            "non-overlapping windows of seqlen tokens (remainder dropped; --eval-nsamples keeps the first N), each "
            "window scored independently with no context carried over; per window the mean NLL of predicting "
            "positions 1..seqlen-1; ppl = exp(mean over windows of the per-window mean NLL)")


def windows(tokens: np.ndarray, seqlen: int, nsamples: int | None = None) -> np.ndarray:
  """``[n, seqlen]`` non-overlapping windows (remainder dropped), the first ``nsamples`` if given."""
  n = len(tokens) // seqlen
  if n == 0:
    raise InputError(f"text has {len(tokens)} tokens, fewer than one window of seqlen {seqlen}")
  if nsamples is not None:
    n = min(n, nsamples)
  return tokens[: n * seqlen].reshape(n, seqlen)


LOGIT_CHUNK_ELEMENTS = 1 << 22   # float32 logits per chunk of positions (16 MiB)


def logits_chunk(vocab: int) -> int:
  """Positions whose logits :func:`token_nll` materializes at once: a power of two keeping ``chunk * vocab``
  within :data:`LOGIT_CHUNK_ELEMENTS` (64 for a 49,152-token vocabulary; whole windows for small ones)."""
  return 1 << max(4, (LOGIT_CHUNK_ELEMENTS // vocab).bit_length() - 1)


def token_scores(model, params, ids):
  """``(nll, greedy)`` of each next token: ``nll = -log p(ids[:, i + 1] | ids[:, :i + 1])`` float32 and ``greedy``
  (the argmax of that distribution is ``ids[:, i + 1]``) bool, both ``[b, T - 1]`` for ``ids [b, T]``.

  The logits are computed :func:`logits_chunk` positions at a time inside a ``lax.map`` (``logsumexp(z) -
  z[target]``), so a large vocabulary never holds ``[b, T, vocab]`` float32 logits (400 MB for one 2048-token
  SmolLM2 window)."""
  return head_scores(model, params, model.hidden(params, ids[:, :-1]), ids[:, 1:])


def head_scores(model, params, x, targets):
  """``(nll, greedy)`` ``[b, p]`` of ``targets [b, p]`` under the logits of hidden states ``x [b, p, d]`` (the
  chunked log-softmax of :func:`token_scores`)."""
  b, t1, d = x.shape
  c = min(logits_chunk(model.config.vocab_size), t1)
  n = -(-t1 // c)
  x = jnp.pad(x, ((0, 0), (0, n * c - t1), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)
  tgt = jnp.pad(targets, ((0, 0), (0, n * c - t1))).reshape(b, n, c).swapaxes(0, 1)

  def chunk(args):
    xc, tc = args
    z = model.head(params, xc)
    target = jnp.take_along_axis(z, tc[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(z, axis=-1) - target, jnp.argmax(z, axis=-1) == tc

  nll, greedy = jax.lax.map(chunk, (x, tgt))
  unchunk = lambda a: a.swapaxes(0, 1).reshape(b, n * c)[:, :t1]
  return unchunk(nll), unchunk(greedy)


def token_nll(model, params, ids):
  """The ``nll`` of :func:`token_scores`: float32 ``[b, T - 1]`` for ``ids [b, T]``."""
  return token_scores(model, params, ids)[0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def window_nll(model, params, ids, micro_batch: int | None = None):
  """Mean NLL of positions 1..T-1 of each row of ``ids [b, T]`` -> float32 ``[b]`` (:func:`token_nll`).

  With ``micro_batch = m`` the ``b`` rows are scored ``m`` at a time inside one compiled ``lax.map`` (``b % m``
  must be 0): on CPU the ``[m, heads, T, T]`` attention scores then stay in cache, about 2x faster than one
  large batch (``eval/bench_ppl.py``). On ``model.mesh`` the micro-batches are split over its ``data`` axis.
  """
  nll = lambda rows: jnp.mean(token_nll(model, params, rows), axis=-1)
  if micro_batch is None or micro_batch >= ids.shape[0]:
    return nll(ids)
  return meshlib.map_rows(nll, ids.reshape(-1, micro_batch, ids.shape[1]), model.mesh).reshape(-1)


def default_micro_batch() -> int | None:
  """1 on CPU (see :func:`window_nll`), whole batches on accelerators."""
  return 1 if jax.default_backend() == "cpu" else None


def _signature(params):
  """A hashable description of a parameter pytree's structure, shapes, dtypes and shardings (what compilation
  depends on; the sharding is None for host arrays)."""
  leaves, treedef = jax.tree.flatten(params)
  return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype).name, _sharding(x)) for x in leaves)


def _sharding(x):
  sharding = getattr(x, "sharding", None)
  return sharding if isinstance(sharding, NamedSharding) else None


@functools.lru_cache(maxsize=16)
def _compiled_nll(model, signature, batch_shape, micro_batch):
  """:func:`window_nll` compiled ahead of time for one model (hooks included: they compare by value), parameter
  signature and batch shape; cached, so evaluating the same model again (another text, a second call) compiles
  nothing (timings exclude compilation either way)."""
  treedef, avals = signature
  abstract = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d, sh in avals])
  ids = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=_batch_sharding(model, batch_shape))
  return window_nll.lower(model, abstract, ids, micro_batch).compile()


def _batch_sharding(model, shape):
  """Windows ``[b, T]`` split over the mesh's ``data`` axis (None without a mesh)."""
  return None if model.mesh is None else meshlib.rows_sharding(model.mesh, shape)


@dataclasses.dataclass(frozen=True)
class PPLResult:
  ppl: float
  nll: np.ndarray          # per-window mean NLL
  tokens_per_second: float  # scored tokens / wall time, compilation excluded
  seqlen: int


def default_batch_size(seqlen: int, vocab: int, budget_bytes: int = 1 << 28) -> int:
  """Windows per batch so that the float32 logits stay within ``budget_bytes``."""
  return int(max(1, min(64, budget_bytes // (4 * seqlen * vocab))))


def perplexity(model, params, tokens: np.ndarray, seqlen: int, nsamples: int | None = None,
               batch_size: int | None = None, progress: bool = True, desc: str = "ppl") -> PPLResult:
  """Perplexity of ``model`` on ``tokens`` (1-D int array) with :data:`PROTOCOL`."""
  w = windows(tokens, seqlen, nsamples)
  bs = batch_size or default_batch_size(seqlen, model.config.vocab_size)
  bs = min(bs, len(w))
  d = meshlib.device_count(model.mesh, ("data",))
  bs = -(-bs // d) * d                        # whole windows per data-parallel device (padding is scored, dropped)
  nb = -(-len(w) // bs)
  padded = np.concatenate([w, np.repeat(w[:1], nb * bs - len(w), axis=0)]).reshape(nb, bs, seqlen)
  step = _compiled_nll(model, _signature(params), (bs, seqlen), default_micro_batch())
  out = []
  start = time.perf_counter()
  for batch in progress_bar(padded, desc=desc, enabled=progress):
    out.append(step(params, jnp.asarray(batch) if model.mesh is None else meshlib.put_rows(batch, model.mesh)))
  nll = np.concatenate([meshlib.to_host(o) for o in out])[: len(w)]
  elapsed = time.perf_counter() - start
  return PPLResult(float(np.exp(np.mean(nll.astype(np.float64)))), nll, len(w) * seqlen / elapsed, seqlen)
