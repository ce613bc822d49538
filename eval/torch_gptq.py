"""A faithful PyTorch implementation of the published GPTQ algorithm (the reference framework's ``fasterquant``,
as described in ``shared/reference/qllm-infer-notes.md`` section 2.7), used as the speed peer of
``eval/bench_quantize.py`` and as an independent numerical reference in the tests. Written from the algorithm
description; not copied from any repository.
"""
from __future__ import annotations

import torch


def _fit(x, bits, sym):
  """Reference quantizer parameters per row of ``x`` (notes section 2.1, including quirk Q1)."""
  maxq = 2**bits - 1
  xmin = torch.minimum(x.min(1).values, torch.zeros(1))
  xmax = torch.maximum(x.max(1).values, torch.zeros(1))
  if sym:
    xmax = torch.maximum(xmin.abs(), xmax)
    xmin = torch.where(xmin < 0, -xmax, xmin)
  dead = (xmin == 0) & (xmax == 0)
  xmin[dead], xmax[dead] = -1, 1
  scale = (xmax - xmin) / maxq
  zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
  return scale[:, None], zero[:, None]


def _quant(x, scale, zero, bits):
  q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
  return scale * (q - zero)


def gptq(w, h, *, bits, group_size=-1, sym=False, act_order=False, static_groups=False, percdamp=0.01,
         block_size=128):
  """Returns the fake-quantized ``[out, in]`` float32 weight and the total loss (reference semantics)."""
  w = w.clone().float()
  h = h.clone().float()
  cols = w.shape[1]
  scale, zero = _fit(w, bits, sym)
  dead = torch.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  if static_groups:
    groups = [_fit(w[:, i:i + group_size], bits, sym) for i in range(0, cols, group_size)]
  if act_order:
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    w, h = w[:, perm], h[perm][:, perm]
    invperm = torch.argsort(perm)
  losses = torch.zeros_like(w)
  q = torch.zeros_like(w)
  h[range(cols), range(cols)] += percdamp * torch.mean(torch.diag(h))
  h = torch.linalg.cholesky(h)
  h = torch.cholesky_inverse(h)
  hinv = torch.linalg.cholesky(h, upper=True)
  for i1 in range(0, cols, block_size):
    i2 = min(i1 + block_size, cols)
    w1 = w[:, i1:i2].clone()
    q1, err1, loss1 = torch.zeros_like(w1), torch.zeros_like(w1), torch.zeros_like(w1)
    hinv1 = hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      col = w1[:, i]
      d = hinv1[i, i]
      if group_size > 0:
        if not static_groups:
          if (i1 + i) % group_size == 0:
            scale, zero = _fit(w[:, i1 + i:i1 + i + group_size], bits, sym)
        else:
          idx = int(perm[i1 + i]) if act_order else i1 + i
          scale, zero = groups[idx // group_size]
      qc = _quant(col[:, None], scale, zero, bits)[:, 0]
      q1[:, i] = qc
      loss1[:, i] = (col - qc) ** 2 / d**2
      e = (col - qc) / d
      w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
      err1[:, i] = e
    q[:, i1:i2] = q1
    losses[:, i1:i2] = loss1 / 2
    w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
  if act_order:
    q = q[:, invperm]
  return q, float(torch.sum(losses))


def gptq_model(model, windows, *, true_sequential=False, hessian_dtype=torch.float32, **config):
  """The reference layer-wise GPTQ pipeline (``llama_sequential`` / ``opt_sequential``, notes section 2.7) on a
  transformers causal LM, quantizing its decoder linears in place (fake-quantized float32 weights).

  The inputs of decoder layer 0 are captured for every window of ``windows [n, T]`` (int); per layer, every
  linear's ``H = (2 / n) sum x x^T`` is accumulated with forward hooks over all windows, each linear is quantized
  with :func:`gptq` (``config``: its keyword arguments), and the quantized layer is run on the same inputs to give
  the next layer's inputs. ``true_sequential`` quantizes the LLaMA sub-groups ``[q,k,v] -> [o] -> [gate,up] ->
  [down]`` (OPT ``[q,k,v] -> [out] -> [fc1] -> [fc2]``) in order, re-collecting inputs after each.
  ``hessian_dtype=torch.float64`` accumulates ``H`` in double precision (then rounds it to float32): the same
  algorithm up to float rounding, used to measure how far float rounding alone moves the result. Returns
  ``{"layers": [{linear name: loss}], "seconds": [per layer]}``.
  """
  import time
  decoder = getattr(model.model, "decoder", model.model)
  layers = decoder.layers
  ids = torch.as_tensor(windows, dtype=torch.long)
  inps, kw = [], {}

  class Catcher(torch.nn.Module):
    def __init__(self, layer):
      super().__init__()
      self.layer = layer

    def forward(self, x, *args, **kwargs):
      inps.append(x)
      kw.update(kwargs)
      raise ValueError

  report = {"layers": [], "seconds": []}
  with torch.no_grad():
    layers[0] = Catcher(layers[0])
    for row in ids:
      try:
        model(row[None], use_cache=False)
      except ValueError:
        pass
    layers[0] = layers[0].layer
    kw.pop("past_key_values", None)
    kw["use_cache"] = False
    for layer in layers:
      t0 = time.perf_counter()
      lins = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
      groups = _sequential_groups(lins) if true_sequential else [list(lins)]
      losses = {}
      for group in groups:
        hs = {name: torch.zeros(lins[name].in_features, lins[name].in_features, dtype=hessian_dtype)
              for name in group}

        def hook(name):
          def f(_, inp, __):
            x = inp[0].reshape(-1, inp[0].shape[-1]).to(hessian_dtype)
            hs[name] += x.T @ x
          return f

        handles = [lins[name].register_forward_hook(hook(name)) for name in group]
        for x in inps:
          layer(x, **kw)
        for hd in handles:
          hd.remove()
        for name in group:
          m = lins[name]
          q, losses[name] = gptq(m.weight.data, (hs[name] * (2.0 / len(inps))).float(), **config)
          m.weight.data = q.to(m.weight.dtype)
      inps = [_hidden(layer(x, **kw)) for x in inps]
      report["layers"].append(losses)
      report["seconds"].append(time.perf_counter() - t0)
  return report


def _hidden(out):
  return out[0] if isinstance(out, tuple) else out


_SUBGROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj", "out_proj"), ("gate_proj", "up_proj", "fc1"),
              ("down_proj", "fc2"))


def _sequential_groups(lins):
  groups = [[n for n in lins if n.rsplit(".", 1)[-1] in names] for names in _SUBGROUPS]
  return [g for g in groups if g]


def perplexity(model, tokens, seqlen, nsamples=None):
  """Token-level perplexity of a transformers causal LM over the first ``nsamples`` non-overlapping windows of
  ``seqlen`` tokens of ``tokens`` (qjax's protocol): exp of the mean over windows of the mean NLL of positions
  1..seqlen-1."""
  n = len(tokens) // seqlen if nsamples is None else min(nsamples, len(tokens) // seqlen)
  ids = torch.as_tensor(tokens[: n * seqlen], dtype=torch.long).reshape(n, seqlen)
  nlls = []
  with torch.no_grad():
    for row in ids:
      logits = model(row[None], use_cache=False).logits.float()
      nlls.append(torch.nn.functional.cross_entropy(logits[0, :-1], row[1:]).double())
  return float(torch.exp(torch.stack(nlls).mean()))
