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


