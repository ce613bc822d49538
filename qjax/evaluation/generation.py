"""Text generation with a preallocated KV cache (the command line is :mod:`qjax.generate`).

:class:`Generator` compiles a prefill (prompts -> cache + first token) and ONE single-token decode step
over a static-length cache pytree (the cache is donated to both), then decodes either with a host loop that
calls the step once per token (``callback`` given: streaming) or with one compiled ``lax.while_loop`` (no
callback). Both compile once per (batch, prompt length, cache length), not per number of steps, and draw the same
tokens: token ``j`` of a row (``j = 0`` from the prefill) uses the key ``fold_in(key(seed), j)``. Greedy when
``temperature == 0``; otherwise softmax sampling after temperature, top-k and top-p (the Hugging Face order).
Prompts of different lengths are LEFT padded (positions count real tokens, so padding changes nothing). A row
stops at its first stop token (EOS of the config and tokenizer by default) or, given ``stop_strings``, as soon as
its text contains one of them (checked on the host after every token, so that mode uses the host loop). The cache comes from a factory
``(config, batch, max_len, dtype) -> KVCache`` (default :meth:`KVCache.dense`), so caches whose layers implement
``update(k, v, index, positions, rope)`` (quantized KIVI/KVQuant caches) plug in unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import mesh as meshlib
from qjax.core.errors import InputError
from qjax.models import DTYPES, CausalLM
from qjax.models.kv_cache import KVCache

CacheFactory = Callable[..., KVCache]
"""``(config, batch, max_len, dtype) -> KVCache`` with every layer cache empty and ``length == 0``."""

Callback = Callable[[int, np.ndarray, np.ndarray], None]
"""``callback(j, tokens [b] int32, active [b] bool)`` after new token ``j`` (0-based) of every row is known;
``active`` is False for rows that stopped before this token."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Decoding rule. ``temperature == 0``: greedy (argmax). ``top_k == 0`` and ``top_p == 1``: no filtering."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise InputError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise InputError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise InputError(f"top-p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """One :meth:`Generator.generate` call.

  ``tokens[i]``: the new token ids of prompt ``i``, ending with the stop token, or the token that completed a
  stop string, when one ended the row (``finish_reasons[i] == "stop"``; else ``"length"``: ``max_new_tokens``
  reached or the cache full). ``texts[i]``: their text without the stop token, cut before the first stop string
  (``None`` without a tokenizer). Timings exclude compilation:
  ``prefill_seconds`` runs the prompts and samples the first token; ``decode_seconds`` covers ``decode_steps``
  batched steps of one token per row (and, with a callback, the callback's time).
  """
  tokens: list[list[int]]
  texts: list[str] | None
  finish_reasons: list[str]
  prompt_lengths: list[int]
  max_len: int
  prefill_seconds: float
  decode_seconds: float
  decode_steps: int
  compile_seconds: float
  cache_bytes_per_token: float

  @property
  def decode_tokens_per_second(self) -> float | None:
    """Decoded tokens per second, every row of the batch counted at every step; ``None`` without a step."""
    if not self.decode_steps:
      return None
    return self.decode_steps * len(self.tokens) / self.decode_seconds


def cache_bytes_per_token(cache: KVCache) -> float:
  """Bytes the layer caches store per cache slot of one sequence, summed over layers: every array of
  ``cache.layers`` (K and V, and the scales/zero points of a quantized cache) / (batch * max_len)."""
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers))
  return nbytes / (cache.valid.shape[0] * cache.max_len)


def eos_token_ids(config, tokenizer=None) -> tuple[int, ...]:
  """The model's EOS ids: ``eos_token_id`` of the config (an int or a tuple) and of the tokenizer, sorted."""
  ids = config.eos_token_id if isinstance(config.eos_token_id, tuple) else (config.eos_token_id,)
  ids += (getattr(tokenizer, "eos_token_id", None),)
  return tuple(sorted({int(i) for i in ids if i is not None}))


def left_pad(prompts: Sequence[Sequence[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(input_ids [b, t] int32, attention_mask [b, t] int32)``, each prompt right-aligned (padding id 0);
  ``t`` is the longest prompt's length, or ``length`` when that is longer."""
  t = max([len(p) for p in prompts] + [length or 0])
  ids = np.zeros((len(prompts), t), np.int32)
  mask = np.zeros((len(prompts), t), np.int32)
  for i, p in enumerate(prompts):
    ids[i, t - len(p):] = p
    mask[i, t - len(p):] = 1
  return ids, mask


def bucket(n: int, cap: int, minimum: int = 64) -> int:
  """The smallest power of two ``>= max(n, minimum)``, capped at ``cap`` (``n`` itself when ``n > cap``): cache
  and prompt sizes drawn from a few buckets, so that a growing conversation compiles once per bucket."""
  if n > cap:
    return n
  return min(cap, 1 << (max(n, minimum) - 1).bit_length())


def plan_lengths(prompt_len: int, max_new_tokens: int, context: int, max_len: int | None = None) -> tuple[int, int]:
  """``(cache max_len, new tokens to generate)`` for a longest prompt of ``prompt_len`` tokens.

  The cache holds the prompt and the new tokens: ``max_len`` defaults to ``prompt_len + max_new_tokens`` capped
  at the model ``context``, and the new tokens are capped at ``max_len - prompt_len``.
  """
  if max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
  if prompt_len < 1:
    raise InputError("empty prompt: nothing to condition on")
  if prompt_len > context:
    raise InputError(f"prompt of {prompt_len} tokens is longer than the model context ({context} tokens)")
  if max_len is not None and max_len > context:
    raise InputError(f"cache length {max_len} exceeds the model context ({context} tokens)")
  max_len = max_len or min(prompt_len + max_new_tokens, context)
  if prompt_len >= max_len:
    raise InputError(f"prompt of {prompt_len} tokens leaves no room for new tokens in a cache of {max_len}")
  return max_len, min(max_new_tokens, max_len - prompt_len)


def completion_text(tokenizer, prompt: Sequence[int], new: Sequence[int]) -> str:
  """Text of the ``new`` tokens as they continue ``prompt`` (decoded together, so word-boundary spaces survive),
  special tokens skipped."""
  head = tokenizer.decode(list(prompt), skip_special_tokens=True)
  return tokenizer.decode(list(prompt) + list(new), skip_special_tokens=True)[len(head):]


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens ``[b]`` int32 from ``logits [b, vocab]`` float32.

  Greedy: argmax. Otherwise ``logits / temperature``, keep the ``top_k`` largest (ties kept), keep the smallest
  set of most likely tokens whose probability reaches ``top_p`` (at least one), and draw from the softmax.
  """
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if 0 < sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    desc = -jnp.sort(-logits, axis=-1)
    p = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # probability of the more likely tokens
    cutoff = jnp.min(jnp.where(before < sampling.top_p, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prefill(model: CausalLM, params, input_ids, attention_mask, cache):
  """Writes the prompts ``input_ids [b, t]`` (left padded, ``attention_mask [b, t]``) into ``cache`` ->
  ``(logits [b, vocab] float32 of the last position, cache)``."""
  logits, cache = model.apply(params, input_ids, attention_mask, None, cache)
  return logits[:, -1], cache


def decode_step(model: CausalLM, params, tokens, cache):
  """One token per row, ``tokens [b]`` int32, appended to ``cache`` -> ``(logits [b, vocab] float32, cache)``."""
  logits, cache = model.apply(params, tokens[:, None], jnp.ones((tokens.shape[0], 1), jnp.int32), None, cache)
  return logits[:, 0], cache


def _is_stop(tokens, stop):
  return jnp.any(tokens[:, None] == stop[None, :], axis=-1)


def _prefill_sample(model, sampling, params, input_ids, attention_mask, cache, key):
  logits, cache = prefill(model, params, input_ids, attention_mask, cache)
  return sample(logits, jax.random.fold_in(key, 0), sampling), cache


def _step_sample(model, sampling, params, tokens, cache, key, j):
  logits, cache = decode_step(model, params, tokens, cache)
  return sample(logits, jax.random.fold_in(key, j), sampling), cache


def _decode_loop(model, sampling, params, first, cache, key, n_new, stop):
  """Tokens ``1 .. n_new - 1`` after ``first [b]`` in one ``lax.while_loop``, ending early once every row has
  produced a stop token (``stop [s]`` int32). Returns ``(tokens [b, max_len] int32 with new token j in column j,
  tokens produced, cache)``."""
  out = jnp.zeros((first.shape[0], cache.max_len), jnp.int32).at[:, 0].set(first)

  def cond(s):
    j, _, _, done, _ = s
    return (j < n_new) & ~jnp.all(done)

  def body(s):
    j, tok, c, done, out = s
    tok, c = _step_sample(model, sampling, params, tok, c, key, j)
    return j + 1, tok, c, done | _is_stop(tok, stop), out.at[:, j].set(tok)

  j, _, cache, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, _is_stop(first, stop), out))
  return out, j, cache


class _Compiled:
  """A jitted function compiled ahead of time once per signature (shapes, dtypes, tree structure) of its
  arguments after the first, the parameters, which must be the same pytree at every call.

  Every new signature is compiled and then run once on ``warmup(args)`` (XLA finishes some code generation on
  an executable's first run), both counted in ``seconds``, so that timed calls measure execution only.
  ``warmup`` must return fresh copies of the donated arguments.
  """

  def __init__(self, fn, donate_argnums, warmup):
    self._jit = jax.jit(fn, donate_argnums=donate_argnums)
    self._warmup = warmup
    self._exe = {}
    self.seconds = 0.0

  def __call__(self, *args):
    leaves, treedef = jax.tree.flatten(args[1:])
    sig = (treedef, tuple((x.shape, x.dtype) for x in leaves))
    if sig not in self._exe:
      t0 = time.perf_counter()
      exe = self._exe[sig] = self._jit.lower(*args).compile()
      jax.block_until_ready(exe(*self._warmup(*args)))
      self.seconds += time.perf_counter() - t0
    return self._exe[sig](*args)


def _blank(cache: KVCache) -> KVCache:
  return jax.tree.map(jnp.zeros_like, cache)


class Generator:
  """Generation for one model, parameters (dense or quantized), decoding rule and cache type.

  ``tokenizer`` (optional) encodes string prompts (special tokens as it adds them by default) and decodes the
  texts; ``cache_factory`` builds the cache (see :data:`CacheFactory`) with ``cache_dtype`` (default: the model's
  compute dtype). Each new shape (batch, prompt length, cache length) compiles once; later calls reuse it.
  """

  def __init__(self, model: CausalLM, params, tokenizer=None, *, sampling: Sampling = Sampling(),
               cache_factory: CacheFactory = KVCache.dense, cache_dtype=None):
    self.model, self.params, self.tokenizer, self.sampling = model, params, tokenizer, sampling
    self.cache_factory = cache_factory
    self.cache_dtype = cache_dtype or DTYPES[model.dtype]
    self._prefill = _Compiled(functools.partial(_prefill_sample, model, sampling), (3,),
                              lambda p, ids, mask, cache, key: (p, ids, mask, _blank(cache), key))
    self._step = _Compiled(functools.partial(_step_sample, model, sampling), (2,),
                           lambda p, tok, cache, key, j: (p, tok, _blank(cache), key, j))
    self._loop = _Compiled(functools.partial(_decode_loop, model, sampling), (2,),  # one step of the body
                           lambda p, tok, cache, key, n, stop: (p, tok, _blank(cache), key, np.int32(2), stop))

  def encode(self, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("string prompts need a tokenizer")
      return list(self.tokenizer(prompt)["input_ids"])
    return [int(t) for t in prompt]

  def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int, *, max_len: int | None = None,
               stop_tokens: Sequence[int] | None = None, stop_strings: Sequence[str] = (), seed: int = 0,
               callback: Callback | None = None, pad_to: int | None = None) -> GenerationResult:
    """Continues every prompt (a string or token ids) by up to ``max_new_tokens`` tokens, in one batch.

    ``max_len``: cache slots (default: longest prompt + ``max_new_tokens``, capped at the model context).
    ``stop_tokens``: ids that end a row (default :func:`eos_token_ids`; ``()``: never stop early).
    ``stop_strings``: texts that end a row once the text of its new tokens, decoded alone (special tokens
    skipped, as lm-eval's ``hf`` model cuts its ``until``), contains one; needs the tokenizer and decodes on the
    host after every token (the new tokens only, never the prompt). With
    ``callback`` the host loop decodes and calls it after every token; without, one compiled while loop does.
    ``pad_to``: left-pad the prompts to at least this many tokens (padding takes cache slots, changes no
    result, and lets prompts of different lengths share one compiled prefill).
    """
    ids = [self.encode(p) for p in prompts]
    stop_strings = [s for s in stop_strings if s]
    if stop_strings and self.tokenizer is None:
      raise ValueError("stop_strings need a tokenizer")
    if not all(ids):
      raise InputError("empty prompt: nothing to condition on")
    width = max([len(p) for p in ids] + [pad_to or 0])
    max_len, n_new = plan_lengths(width, max_new_tokens, self.model.config.max_position_embeddings, max_len)
    input_ids, mask = left_pad(ids, width)
    # rows split over the mesh's data axis (when it divides them)
    input_ids, mask = (meshlib.put_rows(a, self.model.mesh) for a in (input_ids, mask))
    cache = self.cache_factory(self.model.config, len(ids), max_len, self.cache_dtype)
    bytes_per_token = cache_bytes_per_token(cache)
    key = jax.random.key(seed)
    if stop_tokens is None:
      stop_tokens = eos_token_ids(self.model.config, self.tokenizer)
    stop = _stop_array(stop_tokens)
    compile0 = self.compile_seconds
    t0 = time.perf_counter()
    first, cache = self._prefill(self.params, input_ids, mask, cache, key)
    first = meshlib.to_host(first)
    prefill_s = time.perf_counter() - t0 - (self.compile_seconds - compile0)
    compile1 = self.compile_seconds
    t0 = time.perf_counter()
    ended = np.full(len(ids), -1)                # column of the token that completed a stop string
    if callback is None and not stop_strings:
      out, produced, _ = self._loop(self.params, first, cache, key, np.int32(n_new), stop)
      tokens = meshlib.to_host(out)[:, :int(produced)]
    else:
      tokens = self._host_loop(first, cache, key, n_new, stop, callback,
                               functools.partial(self._string_stops, stop_strings, ended))
    decode_s = time.perf_counter() - t0 - (self.compile_seconds - compile1)
    rows = [_cut(r if e < 0 else r[:e + 1], stop, e >= 0) for r, e in zip(tokens, ended)]
    texts = None
    if self.tokenizer is not None:
      texts = [_cut_text(completion_text(self.tokenizer, p, r[:-1] if why == "stop" and e < 0 else r), stop_strings)
               for p, (r, why), e in zip(ids, rows, ended)]
    return GenerationResult(
        tokens=[r for r, _ in rows], texts=texts, finish_reasons=[why for _, why in rows],
        prompt_lengths=[len(p) for p in ids], max_len=max_len, prefill_seconds=prefill_s, decode_seconds=decode_s,
        decode_steps=tokens.shape[1] - 1, compile_seconds=self.compile_seconds - compile0,
        cache_bytes_per_token=bytes_per_token)

  @property
  def compile_seconds(self) -> float:
    return self._prefill.seconds + self._step.seconds + self._loop.seconds

  def _string_stops(self, stop_strings, ended, j, cols, active) -> np.ndarray:
    """Rows (``[b]`` bool) among ``active`` whose new tokens' text after token ``j`` contains a stop string;
    records ``ended[row] = j`` for them."""
    hit = np.zeros(len(ended), bool)
    if not stop_strings:
      return hit
    for i in np.flatnonzero(active):
      text = self.tokenizer.decode([int(c[i]) for c in cols], skip_special_tokens=True)
      if any(s in text for s in stop_strings):
        hit[i], ended[i] = True, j
    return hit

  def _host_loop(self, first, cache, key, n_new, stop, callback, string_stops) -> np.ndarray:
    """Tokens ``[b, n]`` (``n <= n_new``), one compiled step per token. The next step is dispatched before the
    current token is read back, so the host work overlaps the device; stopping costs one extra step.
    ``string_stops(j, cols, active) -> [b] bool`` ends rows on the host (stop strings)."""
    active = np.ones(first.shape[0], bool)
    cols, tok = [], first
    for j in range(n_new):
      nxt = None
      if j + 1 < n_new:
        nxt, cache = self._step(self.params, tok, cache, key, np.int32(j + 1))
      host = meshlib.to_host(tok)
      cols.append(host)
      if callback is not None:
        callback(j, host, active.copy())
      active &= ~np.isin(host, stop)
      active &= ~string_stops(j, cols, active)
      if not active.any():
        break
      tok = nxt
    return np.stack(cols, axis=1)


def _stop_array(tokens: Sequence[int]) -> np.ndarray:
  """Stop ids ``[8k]`` int32 padded with -1 (never drawn): up to 8 stop ids share one compiled loop."""
  out = np.full(8 * max(1, -(-len(tokens) // 8)), -1, np.int32)
  out[:len(tokens)] = tokens
  return out


def _cut(row: np.ndarray, stop: Sequence[int], string_stop: bool = False) -> tuple[list[int], str]:
  """A row's tokens up to and including its first stop token, and why it ended (``string_stop``: the row
  already ends at the token that completed a stop string)."""
  hits = np.flatnonzero(np.isin(row, stop))
  if hits.size:
    return row[:hits[0] + 1].tolist(), "stop"
  return row.tolist(), "stop" if string_stop else "length"


def _cut_text(text: str, stop_strings: Sequence[str]) -> str:
  """``text`` before the first occurrence of any of ``stop_strings``."""
  return text[:min([text.index(s) for s in stop_strings if s in text], default=len(text))]
