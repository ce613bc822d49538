"""An lm-evaluation-harness model (``lm-eval`` 0.4.x, the optional extra ``eval``): any qjax model (float,
quantized weights, activation quantizers, a quantized KV cache) scored by the harness's own tasks and metrics.

    lm = qjax.evaluation.harness.LM(model, params, tokenizer)       # or LM(pretrained="smollm2-135m")
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"], task_manager=...)

Registered with the harness as ``qjax`` (``lm_eval --model qjax --model_args pretrained=PATH``).

What it computes, as the harness's ``hf`` model does (:class:`lm_eval.api.model.TemplateLM` splits each request
into context and continuation tokens: trailing spaces of the context move to the continuation, the continuation
is the tail of the whole string's encoding; an empty context becomes the prefix token):

* ``loglikelihood``: for tokens ``ctx + cont`` (the last ``max_length + 1`` kept), the log-probabilities of
  ``cont`` given everything before it (summed), and ``is_greedy``: whether the argmax at each of its positions is
  the continuation token. Requests with the same context (a multiple-choice question's choices; MMLU's four
  one-token answers) are packed into one row that holds the context once and every continuation after it, each
  continuation seeing the context and itself only (an explicit mask, positions as if alone): the context is
  computed once per question instead of once per choice. Rows are sorted by length and scored ``batch_size`` at a
  time, right-padded to a length bucket (``2^k`` or ``1.5 * 2^k``, at least 16: few compiled shapes).
  Float32 log-softmax over the vocabulary at the scored positions only, a chunk of positions at a time
  (:func:`qjax.evaluation.perplexity.head_scores`).
* ``loglikelihood_rolling``: the harness's rolling windows (``get_rolling_token_windows`` with the prefix token,
  ``max_length``, context 1, disjoint), each scored as above, summed per document.
* ``generate_until``: greedy decoding through the KV-cache :class:`~qjax.evaluation.generation.Generator` (the
  model's cache: dense or quantized), prompts left-truncated to leave room for ``max_gen_toks``, a row stopped at
  EOS or as soon as its text holds one of the request's ``until`` strings (so GSM8K does not decode the whole
  ``max_gen_toks`` budget); the new tokens are decoded alone (special tokens skipped, as the ``hf`` model does)
  and cut at the first ``until`` string. Sampling arguments are refused (greedy only).
"""
from __future__ import annotations

import functools
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from qjax.core.errors import InputError
from qjax.core.progress import bar as progress_bar
from qjax.evaluation import perplexity
from qjax.evaluation.generation import Generator

MIN_BUCKET = 16


def bucket(n: int, cap: int) -> int:
  """The padded length of a batch whose longest row has ``n`` tokens: ``2^k`` or ``1.5 * 2^k`` (at least 16, at
  most ``cap``): two compiled shapes per octave, at most a third of a row padding."""
  b = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
  return min(cap, b * 3 // 4 if b * 3 // 4 >= max(n, MIN_BUCKET) else b)


@functools.partial(jax.jit, static_argnums=0)
def _packed_scores(model, params, ids, seg, pos, at, targets):
  """``(logprob [b, p], greedy [b, p])`` of ``targets [b, p]`` predicted at positions ``at [b, p]`` of packed rows
  ``ids [b, w]``: ``seg [b, w]`` is 0 on the shared context, ``i + 1`` on continuation ``i``, -1 on padding; a token
  sees the earlier tokens of the context and of its own segment; ``pos [b, w]`` its position in its sequence."""
  w = ids.shape[1]
  causal = jnp.arange(w)[None, :] <= jnp.arange(w)[:, None]
  mask = causal[None] & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
  x = jnp.take_along_axis(model.hidden(params, ids, mask, pos), at[..., None], axis=1)
  nll, greedy = perplexity.head_scores(model, params, x, targets)
  return -nll, greedy


@register_model("qjax")
class LM(TemplateLM):
  """The harness model over one qjax ``(model, params, tokenizer)``; see the module docstring.

  ``batch_size``: rows per scoring call; ``max_length``: the longest scored sequence (default: the model's
  context, as the ``hf`` model reads it from the config); ``max_gen_toks``: generation budget when a request
  does not set one; ``cache_factory``: the KV cache of ``generate_until`` (e.g. a KIVI cache factory; default
  dense); ``progress``: bars over requests.
  """

  def __init__(self, model=None, params=None, tokenizer=None, *, pretrained: str | None = None, batch_size=8,
               max_length: int | None = None, max_gen_toks: int = 256, cache_factory=None, progress: bool = True,
               **unused):
    super().__init__()
    if pretrained is not None:
      from qjax.io import quantized
      loaded = quantized.load(pretrained)
      model, params, tokenizer = loaded.model, loaded.params, loaded.tokenizer
    if model is None or params is None or tokenizer is None:
      raise InputError("qjax LM needs (model, params, tokenizer) or pretrained=PATH")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.batch_size = int(batch_size)
    self._max_length = int(max_length or model.config.max_position_embeddings)
    self.max_gen_toks = int(max_gen_toks)
    self.progress = progress
    kwargs = {} if cache_factory is None else {"cache_factory": cache_factory}
    self.generator = Generator(model, params, tokenizer, **kwargs)

  # ------------------------------------------------------------------------------------------ tokens
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The tokenizer's encoding (its own special-token default, as the ``hf`` model; no second BOS when the
    string already starts with it)."""
    kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    bos = self.tokenizer.bos_token
    if add_special_tokens is None and bos and string.startswith(bos):
      kw["add_special_tokens"] = False
    return list(self.tokenizer.encode(string, **kw))

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=True)

  # ------------------------------------------------------------------------------------------ scoring
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
    """``[(sum of log p(cont), is_greedy)]`` for ``requests = [(cache key, ctx tokens, cont tokens)]``, in order.

    Requests whose (truncated) contexts are equal, e.g. the choices of one multiple-choice question, are packed
    into one row: the context once, then each continuation (but its last token) attending to the context and to
    itself only, at the positions it would have alone (:func:`_packed_scores`); the first continuation token
    of each is read at the context's last position. Rows are sorted by length and scored ``batch_size`` at a time,
    right-padded to a :func:`bucket` length."""
    rows = self._pack(requests)
    out: list = [None] * len(requests)
    bar = progress_bar(total=len(requests), desc="loglikelihood", enabled=self.progress and not disable_tqdm)
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      width = bucket(max(max(len(r["ids"]), len(r["at"])) for r in chunk), self.max_length + 1)
      arrays = {k: np.full((self.batch_size, width), fill, np.int32)
                for k, fill in (("ids", 0), ("seg", -1), ("pos", 0), ("at", 0), ("targets", 0))}
      for b, r in enumerate(chunk):
        for k in arrays:
          arrays[k][b, :len(r[k])] = r[k]
      logp, greedy = (np.asarray(a) for a in _packed_scores(self.model, self.params,
                                                            *(jnp.asarray(arrays[k]) for k in arrays)))
      for b, r in enumerate(chunk):
        for i, lo, hi in r["members"]:
          out[i] = (float(logp[b, lo:hi].astype(np.float64).sum()), bool(greedy[b, lo:hi].all()))
          if requests[i][0] is not None:
            self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        bar.update(len(r["members"]))
    bar.close()
    return out

  def _pack(self, requests) -> list[dict]:
    """Packed rows (see :meth:`_loglikelihood_tokens`), longest first: ``ids, seg, pos`` of the row, ``at,
    targets`` of its scored positions and ``members = [(request index, first, end)]`` (its slice of them)."""
    groups = defaultdict(list)
    for i, (_, ctx, cont) in enumerate(requests):
      if not cont:
        raise InputError("loglikelihood request with an empty continuation")
      whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
      n = min(len(cont), len(whole) - 1)
      groups[tuple(whole[:-n])].append((i, whole[-n:]))
    rows = []
    for ctx, members in groups.items():
      row = None
      for i, cont in members:
        if row is None or len(row["ids"]) + len(cont) - 1 > self.max_length:
          row = {"ids": list(ctx), "seg": [0] * len(ctx), "pos": list(range(len(ctx))), "at": [], "targets": [],
                 "members": []}
          rows.append(row)
        first = len(row["at"])
        start = len(row["ids"])
        row["at"] += [len(ctx) - 1] + list(range(start, start + len(cont) - 1))
        row["targets"] += cont
        row["ids"] += cont[:-1]
        row["seg"] += [len(row["members"]) + 1] * (len(cont) - 1)
        row["pos"] += list(range(len(ctx), len(ctx) + len(cont) - 1))
        row["members"].append((i, first, len(row["at"])))
    return sorted(rows, key=lambda r: -max(len(r["ids"]), len(r["at"])))

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for k, req in enumerate(requests):
      (string,) = req.args
      for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append((None, *w))
        owner.append(k)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for k, (lp, _) in zip(owner, scores):
      totals[k] += lp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
    return totals

  # ------------------------------------------------------------------------------------------ generation
  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups = defaultdict(list)
    for i, req in enumerate(requests):
      context, kwargs = req.args
      kwargs = dict(kwargs or {})
      if kwargs.pop("do_sample", False) or kwargs.get("temperature", 0.0) not in (0, 0.0, None):
        raise InputError("the qjax lm-eval model decodes greedily: do_sample / temperature > 0 are not supported")
      until = kwargs.get("until", [self.tok_decode([self.eot_token_id])])
      until = [until] if isinstance(until, str) else list(until)
      groups[(tuple(until), int(kwargs.get("max_gen_toks", self.max_gen_toks)))].append((i, context))
    out: list = [None] * len(requests)
    bar = progress_bar(total=len(requests), desc="generate_until", enabled=self.progress and not disable_tqdm)
    for (until, budget), items in groups.items():
      room = self.max_length - budget
      if room < 1:
        raise InputError(f"max_gen_toks {budget} leaves no room for a prompt within max_length {self.max_length}")
      for start in range(0, len(items), self.batch_size):
        chunk = items[start:start + self.batch_size]
        prompts = [self.tok_encode(c)[-room:] or [self.prefix_token_id] for _, c in chunk]
        width = bucket(max(map(len, prompts)), room)
        res = self.generator.generate(prompts, budget, max_len=width + budget, pad_to=width, stop_strings=until)
        for (i, context), toks in zip(chunk, res.tokens):
          text = self.tok_decode(toks)           # the new tokens alone, as the hf model decodes them
          for stop in until:
            if stop and stop in text:
              text = text[:text.index(stop)]
          out[i] = text
          self.cache_hook.add_partial("generate_until", (context, {"until": list(until)}), text)
        bar.update(len(chunk))
    bar.close()
    return out
