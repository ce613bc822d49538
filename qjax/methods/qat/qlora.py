"""QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): fine-tune low-rank adapters on a
frozen 4-bit NormalFloat base.

Every target linear's weight is stored as :class:`~qjax.core.formats.nf4.NF4Array` (NF4 in blocks of 64 with
absmax scales, double-quantized: 8-bit scales in blocks of 256, 4.127 bits per weight) and frozen; each gets a
LoRA adapter ``A [r, in]`` (Gaussian), ``B [out, r]`` (zero), trained on next-token cross-entropy over the
calibration windows (the fine-tuning text). The forward pass runs in ``compute_dtype`` (bfloat16, the paper's
choice): ``y = x NF4(W0)^T + (alpha / r) dropout(x) A^T B^T``, the adapter branch added to each target linear by a
Flax method interceptor (dropout on the adapter's input only, as in LoRA/PEFT). The result keeps base and adapter
apart (:class:`~qjax.core.formats.nf4.NF4LoRAArray`): it runs and saves like any quantized weight, the adapters
export on their own (:func:`qjax.io.lora_adapters.save_adapters`) and :func:`merge` folds them in. The memory
arithmetic of 16-bit fine-tuning versus QLoRA, per parameter group, is :func:`memory_table`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.core import tree
from qjax.core.errors import InputError
from qjax.core.formats.base import is_quantized
from qjax.core.formats.nf4 import NF4Array, NF4LoRAArray
from qjax.core.options import Flag, option
from qjax.methods.qat import lora, objectives
from qjax.methods.qat.config import TrainConfig
from qjax.methods.registry import register_method
from qjax.models import layers
from qjax.models.families import DECODER_LINEARS

COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QLoRAConfig:
  rank: int = option(16, lora.RANK)
  alpha: float = option(16.0, lora.ALPHA)
  dropout: float = option(0.05, Flag("--lora-dropout", "LoRA dropout on the adapter's input (training only)"))
  block_size: int = 64
  double_quant: bool = True
  block2: int = 256
  compute_dtype: str = "bfloat16"
  train: TrainConfig = TrainConfig(steps=100, lr=2e-4, warmup=10, weight_decay=0.0)
  targets: tuple[str, ...] = DECODER_LINEARS

  def __post_init__(self):
    lora.check(self.rank, self.alpha, "QLoRA")
    if not 0 <= self.dropout < 1:
      raise InputError(f"QLoRA dropout must be in [0, 1), got {self.dropout}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise InputError(f"QLoRA compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
    if not isinstance(self.train, TrainConfig):
      raise InputError(f"QLoRA train must be a TrainConfig, got {type(self.train).__name__}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def quantize_base(w, cfg: QLoRAConfig) -> NF4Array:
  """The frozen NF4 base of one weight ``[out, in]`` (dequantizing to ``w.dtype``)."""
  return NF4Array.quantize(w, block_size=cfg.block_size, double_quant=cfg.double_quant, block2=cfg.block2)


def _dropout(x, rate: float, key):
  if rate == 0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def adapted_logits(model, params, adapters: dict, tokens, cfg: QLoRAConfig, key=None):
  """Logits of ``model`` on ``tokens`` with ``adapters`` (``{weight path: {"a", "b"}}``) added beside the linears
  at those paths (dropout on their inputs when ``key`` is given)."""
  index = {p: i for i, p in enumerate(sorted(adapters))}

  def add_adapter(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    path = "/".join(context.module.path) + "/weight"
    if isinstance(context.module, layers.Linear) and context.method_name == "__call__" and path in adapters:
      x = args[0] if key is None else _dropout(args[0], cfg.dropout, jax.random.fold_in(key, index[path]))
      ad = adapters[path]
      h = jax.lax.dot_general(x, ad["a"].astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
      y = y + (cfg.scale * jax.lax.dot_general(h, ad["b"].astype(x.dtype), (((h.ndim - 1,), (1,)), ((), ())))
               ).astype(y.dtype)
    return y

  with nn.intercept_methods(add_adapter):
    return model.apply(params, tokens)[0]


def _in_dtype(params, dtype: str):
  """Floating leaves cast to ``dtype``; NF4 bases dequantizing to it."""
  def cast(v):
    if isinstance(v, NF4Array):
      return dataclasses.replace(v, dtype=dtype)
    return v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
  return tree.unflatten({p: cast(v) for p, v in tree.flatten(params).items()})


@register_method(QLoRAConfig, name="qlora", needs_calibration=True, mixed=False)
def quantize(params, rules=QLoRAConfig(), *, model=None, calibration=None, progress: bool = True):
  """``(params, TrainReport)``: every weight of ``rules`` as an :class:`NF4LoRAArray` (NF4 base + the adapter
  trained on ``calibration``'s windows), the registered handler."""
  assignment, cfg = objectives.one_config(params, rules, calibration, "QLoRA")
  flat = tree.flatten(params)
  if any(is_quantized(flat[p]) for p in assignment):
    raise InputError("QLoRA quantizes a float model to NF4: its targets must be float weights")
  bases = {p: quantize_base(flat[p], cfg) for p in assignment}
  adapters = lora.init_all(jax.random.PRNGKey(cfg.train.seed), {p: flat[p].shape for p in assignment}, cfg.rank)
  compute = dataclasses.replace(model or calibration.model, dtype=cfg.compute_dtype)
  frozen = _in_dtype(tree.unflatten({**flat, **bases}), cfg.compute_dtype)

  def loss_fn(adapters, frozen, tokens, key):
    logits = adapted_logits(compute, frozen, adapters, tokens[:, :-1], cfg, key)
    return objectives.cross_entropy(logits, tokens[:, 1:])

  seqlen = calibration.windows.shape[1]
  adapters, report = calibration.train(
      loss_fn, adapters, cfg.train, frozen=frozen,
      activation_bytes=objectives.activation_bytes(compute, cfg.train.batch_size, seqlen - 1), progress=progress,
      desc=f"QLoRA NF4 r{cfg.rank}")
  out = {p: NF4LoRAArray(**{f.name: getattr(b, f.name) for f in dataclasses.fields(NF4Array)},
                         lora_a=adapters[p]["a"], lora_b=adapters[p]["b"], lora_scale=cfg.scale)
         for p, b in bases.items()}
  return tree.replace(params, assignment, lambda p, _: out[p]), report


def merge(params, *, requantize: bool = False):
  """Every :class:`NF4LoRAArray` folded into one weight: the dense merged matrix ``NF4(W0) + (alpha / r) B A``,
  or with ``requantize`` that matrix quantized to NF4 again (the base's block settings; the adapter's fine
  detail is then rounded away)."""
  def fold(v):
    if not isinstance(v, NF4LoRAArray):
      return v
    w = v.dequantize()
    return NF4Array.quantize(w, block_size=v.block_size, double_quant=v.double_quant, block2=v.block2) \
        if requantize else w
  return tree.unflatten({p: fold(v) for p, v in tree.flatten(params).items()})


def memory_table(float_params, qlora_params) -> dict:
  """Bytes per parameter group for full 16-bit fine-tuning of ``float_params`` versus QLoRA as
  ``qlora_params`` holds it, with the seed slide's convention (16-bit weights and gradients; Adam keeps a 32-bit
  master copy plus two 32-bit moments, 4 + 8 bytes, per trainable parameter): ``{"16-bit": {...}, "qlora":
  {...}}`` with ``weights``, ``gradients``, ``optimizer``, ``total``, ``trainable`` (count) and ``params``
  (count). QLoRA's weights are the NF4 bases as stored, every other frozen parameter at 16 bits, and the adapters
  at 16 bits; only the adapters have gradients and optimizer state."""
  n = sum(int(v.size) for v in tree.flatten(float_params).values())
  full = {"weights": 2 * n, "gradients": 2 * n, "optimizer": 12 * n, "trainable": n, "params": n}
  frozen, adapter = 0, 0
  for v in tree.flatten(qlora_params).values():
    if isinstance(v, NF4LoRAArray):
      frozen += v.base().nbytes
      adapter += int(v.lora_a.size + v.lora_b.size)
    elif is_quantized(v):
      frozen += v.nbytes
    else:
      frozen += 2 * int(v.size)
  q = {"weights": frozen + 2 * adapter, "gradients": 2 * adapter, "optimizer": 12 * adapter,
       "trainable": adapter, "params": n}
  for d in (full, q):
    d["total"] = d["weights"] + d["gradients"] + d["optimizer"]
  return {"16-bit": full, "qlora": q}
