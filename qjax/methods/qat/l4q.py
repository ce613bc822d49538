"""L4Q (Jeon et al. 2024, "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language Models"):
quantization-aware LoRA. Each linear's weight is ``Q(W0 + (alpha / r) B A)``, fake-quantized by a learned-step
quantizer (LSQ, :func:`qjax.methods.qat.fake_quant.lsq_fake`: per channel or per group steps and, asymmetric, an
integer zero point learned through a rounding STE); ``A``, ``B`` and the quantizer's steps (and zeros) train
together on next-token cross-entropy over the calibration windows, ``W0`` frozen. Training starts at RTN exactly
(``B = 0``, steps and zeros initialized to the MinMax fit). Afterwards the adapter is merged and the merged weight
quantized with the trained steps into a plain :class:`QArray` (:func:`~qjax.methods.qat.fake_quant.lsq_codes`):
with ``scale_dtype="float32"`` it computes exactly what training saw.
"""
from __future__ import annotations

import dataclasses

import jax

from qjax.core import tree, uniform
from qjax.core.errors import InputError
from qjax.core.formats.qarray import QArray
from qjax.core.options import option
from qjax.methods.qat import fake_quant, lora, objectives
from qjax.methods.qat.config import TrainConfig
from qjax.methods.registry import register_method
from qjax.methods.weights import flags
from qjax.models.families import DECODER_LINEARS


@dataclasses.dataclass(frozen=True, kw_only=True)
class L4QConfig:
  bits: int = option(4, flags.BITS)
  group_size: int = option(-1, flags.GROUP_SIZE)
  sym: bool = option(False, flags.SYM)
  rank: int = option(8, lora.RANK)
  alpha: float = option(16.0, lora.ALPHA)
  scale_dtype: str = "float16"          # storage type of the merged QArray's scales
  train: TrainConfig = TrainConfig(steps=100, lr=1e-4, warmup=10)
  targets: tuple[str, ...] = DECODER_LINEARS

  def __post_init__(self):
    uniform.check_grid(self.bits, self.group_size, "L4Q")
    lora.check(self.rank, self.alpha, "L4Q")
    if not isinstance(self.train, TrainConfig):
      raise InputError(f"L4Q train must be a TrainConfig, got {type(self.train).__name__}")


def merged_weight(w0, state: dict, cfg: L4QConfig):
  """``W0 + (alpha / r) B A`` float32 of one linear's trainable ``state`` (``a``, ``b``, ``step``, ``zero``)."""
  return w0.astype("float32") + lora.delta(state, cfg.rank, cfg.alpha)


def fake_weight(w0, state: dict, cfg: L4QConfig):
  """The weight training sees: the LSQ fake quantization of :func:`merged_weight`, in ``w0.dtype``."""
  return fake_quant.lsq_fake(merged_weight(w0, state, cfg), state["step"], cfg.bits, group_size=cfg.group_size,
                             zero=state.get("zero")).astype(w0.dtype)


def to_qarray(w0, state: dict, cfg: L4QConfig) -> QArray:
  """The merged, quantized weight as a QArray."""
  codes, scale, zero = fake_quant.lsq_codes(merged_weight(w0, state, cfg), state["step"], cfg.bits,
                                            group_size=cfg.group_size, zero=state.get("zero"))
  return QArray.from_codes(codes, scale, zero, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
                           dtype=w0.dtype, scale_dtype=cfg.scale_dtype)


@register_method(L4QConfig, name="l4q", needs_calibration=True, mixed=False)
def quantize(params, rules=L4QConfig(), *, model=None, calibration=None, progress: bool = True):
  """``(params, TrainReport)``: adapters and quantizer steps trained on ``calibration``'s windows, merged into
  QArrays (the registered handler)."""
  assignment, cfg = objectives.one_config(params, rules, calibration, "L4Q")
  flat = tree.flatten(params)
  w0 = {p: flat[p] for p in assignment}
  adapters = lora.init_all(jax.random.PRNGKey(cfg.train.seed), {p: w.shape for p, w in w0.items()}, cfg.rank)
  state = {}
  for p, w in w0.items():
    step, zero = fake_quant.lsq_init(w, cfg.bits, group_size=cfg.group_size, sym=cfg.sym)
    state[p] = {**adapters[p], "step": step, **({} if zero is None else {"zero": zero})}
  state, report = objectives.train_weights(
      params, w0, state, lambda w, s: fake_weight(w, s, cfg), model=model or calibration.model,
      calibration=calibration, config=cfg.train, desc=f"L4Q W{cfg.bits} r{cfg.rank}", progress=progress)
  return tree.replace(params, assignment, lambda p, w: to_qarray(w, state[p], cfg)), report
