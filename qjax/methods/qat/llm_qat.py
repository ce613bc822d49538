"""LLM-QAT (Liu et al. 2023, "LLM-QAT: Data-Free Quantization Aware Training for Large Language Models"):
quantization-aware training of weights, activations and the KV cache by distillation from the float model.

The student starts from the float weights. In its forward pass every target linear's weight is MinMax
fake-quantized (symmetric, per output channel by default; :func:`qjax.methods.qat.fake_quant.minmax_fake`), the
linear inputs per token (``abits``) and the keys and values attention reads per token and head (``kv_bits``),
all with straight-through gradients (the activation hooks of :meth:`LLMQATConfig.act_config`). The loss is the KL
divergence from the float teacher's next-token distribution to the student's (soft labels, the teacher run on the
same windows without gradient). The training text is whatever windows the calibration holds; LLM-QAT's is
data-free, the teacher's own generations (:func:`qjax.evaluation.data_free.generated_windows`, ``--calib-dataset
generated``). Only the target linears' weights train (the paper trains the whole network; norms and embeddings
stay float here, so they are left as they are).

After training, each weight is quantized by RTN on the same grid (:func:`qjax.methods.weights.rtn.quantize_weight`),
which is exactly the fake quantizer's forward (bit for bit with ``scale_dtype="float32"``); the model then runs
with :meth:`LLMQATConfig.act_config` as its activation quantizer, through every path a QArray model takes.
Differences from the paper, on purpose: qjax's RTN grid (16 levels at 4 bits, range from ``-max|w|``) instead of
the paper's ``2^(b-1) - 1`` positive levels, so that what trains is what a QArray stores.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from qjax.core import tree, uniform
from qjax.core.errors import InputError
from qjax.core.options import Flag, option
from qjax.methods.activations.quantizers import ActQuantConfig
from qjax.methods.qat import fake_quant, objectives
from qjax.methods.qat.config import TrainConfig
from qjax.methods.registry import register_method
from qjax.methods.weights import flags, rtn
from qjax.models.families import DECODER_LINEARS


@dataclasses.dataclass(frozen=True, kw_only=True)
class LLMQATConfig:
  bits: int = option(4, flags.BITS)
  group_size: int = option(-1, flags.GROUP_SIZE)
  sym: bool = option(True, flags.SYM)
  abits: int = option(8, Flag("--abits", external=True))        # linear inputs, per token (16: float)
  kv_bits: int = option(16, Flag("--qat-kv-bits", "LLM-QAT: keys and values per token and head (16: float)"))
  act_sym: bool = True                  # activations and KV cache: symmetric MinMax
  scale_dtype: str = "float16"          # storage type of the final QArrays' scales
  train: TrainConfig = TrainConfig(steps=200, lr=2e-5, warmup=10)
  targets: tuple[str, ...] = DECODER_LINEARS

  def __post_init__(self):
    uniform.check_grid(self.bits, self.group_size, "LLM-QAT")
    for name in ("abits", "kv_bits"):
      v = getattr(self, name)
      if v != 16 and not 2 <= v <= 8:
        raise InputError(f"LLM-QAT {name} must be between 2 and 8 (or 16 for float), got {v}")
    if not isinstance(self.train, TrainConfig):
      raise InputError(f"LLM-QAT train must be a TrainConfig, got {type(self.train).__name__}")

  def act_config(self) -> ActQuantConfig:
    """The activation and KV-cache quantizers the student trains with and the quantized model runs with."""
    return ActQuantConfig(bits=self.abits, sym=self.act_sym, kv_bits=self.kv_bits)

  def fake_weight(self, w):
    """The weight the student sees: MinMax fake quantization with the identity STE, float32."""
    return fake_quant.minmax_fake(w.astype(jnp.float32), self.bits, sym=self.sym, group_size=self.group_size)


@register_method(LLMQATConfig, name="llm_qat", needs_calibration=True, mixed=False)
def quantize(params, rules=LLMQATConfig(), *, model=None, calibration=None, progress: bool = True):
  """``(params, TrainReport)``: the distilled student's weights as RTN QArrays (the registered handler); run the
  result with ``model.with_hooks(config.act_config().hooks())``."""
  assignment, cfg = objectives.one_config(params, rules, calibration, "LLM-QAT")
  teacher = (model or calibration.model).with_hooks(ActQuantConfig().hooks())
  student = teacher.with_hooks(cfg.act_config().hooks())
  flat = tree.flatten(params)
  dtypes = {p: flat[p].dtype for p in assignment}
  base = {p: v for p, v in flat.items() if p not in assignment}

  def loss_fn(weights, fixed, tokens, key):
    fake = {p: cfg.fake_weight(w).astype(dtypes[p]) for p, w in weights.items()}
    return objectives.distill_loss(student, tree.unflatten({**fixed["base"], **fake}), teacher, fixed["teacher"],
                                   tokens)

  seqlen = calibration.windows.shape[1]
  trained, report = calibration.train(
      loss_fn, {p: flat[p].astype(jnp.float32) for p in assignment}, cfg.train,
      frozen={"base": base, "teacher": params},
      activation_bytes=2 * objectives.activation_bytes(teacher, cfg.train.batch_size, seqlen - 1),
      progress=progress, desc=f"LLM-QAT W{cfg.bits}A{cfg.abits}KV{cfg.kv_bits}")
  out = {p: rtn.quantize_weight(trained[p].astype(dtypes[p]), bits=c.bits, group_size=c.group_size, sym=c.sym,
                                scale_dtype=c.scale_dtype) for p, c in assignment.items()}
  return tree.replace(params, assignment, lambda p, _: out[p]), report
