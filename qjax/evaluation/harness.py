"""An lm-evaluation-harness model (``lm-eval`` 0.4.x, the optional extra ``eval``): any qjax model (float,
quantized weights, activation quantizers, a quantized KV cache) scored by the harness's own tasks and metrics.

    lm = qjax.evaluation.harness.LM(model, params, tokenizer)       # or LM(pretrained="smollm2-135m")
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"], task_manager=...)

Registered with the harness as ``qjax`` (``lm_eval --model qjax --model_args pretrained=PATH``).

What it computes, as the harness's ``hf`` model does (:class:`lm_eval.api.model.TemplateLM` splits each request
into context and continuation tokens: trailing spaces of the context move to the continuation, the continuation
is the tail of the whole string's encoding; an empty context becomes the prefix token):

* ``loglikelihood``: for tokens ``ctx + cont`` (the last ``max_length + 1`` kept), the model runs on all but the
  last token; the log-probabilities of ``cont`` are read at its last ``len(cont)`` positions (summed), and
  ``is_greedy`` says whether the argmax at each of them is the continuation token. Requests are sorted by length
  and scored ``batch_size`` at a time, right-padded to a power-of-two length bucket (at least 16): the causal mask
  keeps padding from changing real positions, and the number of compiled shapes stays ``log2(max_length)``.
  Float32 log-softmax over the vocabulary, computed a chunk of positions at a time
  (:func:`qjax.evaluation.perplexity.token_scores`).
* ``loglikelihood_rolling``: the harness's rolling windows (``get_rolling_token_windows`` with the prefix token,
  ``max_length``, context 1, disjoint), each scored as above, summed per document.
* ``generate_until``: greedy decoding through the KV-cache :class:`~qjax.evaluation.generation.Generator` (the
  model's cache: dense or quantized), prompts left-truncated to leave room for ``max_gen_toks``, stopped at EOS;
  the new tokens are decoded alone (special tokens skipped, as the ``hf`` model does) and cut at the first of the
  request's ``until`` strings. Sampling arguments are refused (greedy only).
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
  """The padded length of a batch whose longest row has ``n`` tokens: a power of two >= 16, at most ``cap``."""
  return min(cap, max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()))


@functools.partial(jax.jit, static_argnums=0)
def _scores(model, params, ids):
  """``(logprob [b, T - 1], greedy [b, T - 1])`` of ``ids [b, T]``'s next tokens (float32, bool)."""
  nll, greedy = perplexity.token_scores(model, params, ids)
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
    """``[(sum of log p(cont), is_greedy)]`` for ``requests = [(cache key, ctx tokens, cont tokens)]``, in order."""
    rows = []
    for _, ctx, cont in requests:
      if not cont:
        raise InputError("loglikelihood request with an empty continuation")
      whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
      rows.append((whole, min(len(cont), len(whole) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list = [None] * len(rows)
    bar = progress_bar(total=len(rows), desc="loglikelihood", enabled=self.progress and not disable_tqdm)
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      width = bucket(len(rows[idx[0]][0]), self.max_length + 1)
      ids = np.zeros((self.batch_size, width), np.int32)
      for r, i in enumerate(idx):
        ids[r, :len(rows[i][0])] = rows[i][0]
      logp, greedy = (np.asarray(a) for a in _scores(self.model, self.params, jnp.asarray(ids)))
      for r, i in enumerate(idx):
        whole, n = rows[i]
        end = len(whole) - 1                       # positions 0..end-1 predict tokens 1..end
        out[i] = (float(logp[r, end - n:end].astype(np.float64).sum()), bool(greedy[r, end - n:end].all()))
        if requests[i][0] is not None:
          self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
      bar.update(len(idx))
    bar.close()
    return out

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
        res = self.generator.generate(prompts, budget, max_len=width + budget, pad_to=width)
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
