"""The training settings every quantization-aware method shares (:class:`TrainConfig`), held by each QAT method's
config and run by the calibration engine's trainer (:meth:`qjax.calibration.Calibration.train`)."""
from __future__ import annotations

import dataclasses

from qjax.core.errors import InputError
from qjax.core.options import Flag, option


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """One optax training run over token windows.

  ``steps`` optimizer steps, each on ``batch_size * accumulate`` windows (``accumulate`` micro-batches whose
  gradients are averaged before one update); AdamW (``b1, b2``, decoupled ``weight_decay`` on matrices only)
  with a learning rate rising linearly from 0 to ``lr`` over ``warmup`` steps (capped at ``steps``), then a cosine to
  ``lr * final_lr_ratio`` at ``steps``; gradients clipped to global norm ``clip_norm`` (0: off). The windows are
  visited in seeded epoch permutations, a pure function of the step (what makes a resumed run exact).
  ``checkpoint_dir``: an orbax checkpoint of the whole train state (parameters, optimizer state, step, loss
  history) every ``checkpoint_every`` steps and at the end, and the run resumes from its latest step when the
  folder already holds one; ``log_path``: one JSON line per step (loss, learning rate, gradient norm, tokens/s).
  ``memory_budget_gb``: refuse to start when the estimate exceeds it (0: 80% of the available host memory).
  """
  steps: int = option(100, Flag("--train-steps", "QAT optimizer steps"))
  batch_size: int = option(4, Flag("--train-batch-size", "QAT windows per micro-batch"))
  accumulate: int = option(1, Flag("--train-accumulate", "QAT micro-batches per optimizer step"))
  lr: float = option(1e-4, Flag("--train-lr", "QAT peak learning rate"))
  warmup: int = option(10, Flag("--train-warmup", "QAT linear warmup steps"))
  final_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = option(0.0, Flag("--train-weight-decay", "QAT AdamW decoupled weight decay (matrices)"))
  clip_norm: float = option(1.0, Flag("--train-clip-norm", "QAT global gradient-norm clip (0: off)"))
  seed: int = option(0, Flag("--seed", external=True))
  checkpoint_every: int = option(0, Flag("--checkpoint-every", "QAT: save the train state every N steps"))
  checkpoint_dir: str | None = option(None, Flag("--checkpoint-dir", "QAT train-state checkpoints; a folder that "
                                                 "holds one resumes the run"))
  log_path: str | None = option(None, Flag("--train-log", "QAT loss log, JSON lines (and a PNG curve beside it)"))
  memory_budget_gb: float = option(0.0, Flag("--memory-budget-gb", "QAT: refuse to train above this estimate "
                                                                   "(0: 80%% of available memory)"))

  def __post_init__(self):
    for name in ("steps", "batch_size", "accumulate"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise InputError(f"training {name} must be a positive integer, got {v!r}")
    if not self.lr > 0:
      raise InputError(f"learning rate must be positive, got {self.lr}")
    if not isinstance(self.warmup, int) or self.warmup < 0:
      raise InputError(f"warmup must be a non-negative integer, got {self.warmup!r}")
    if not 0 <= self.final_lr_ratio <= 1:
      raise InputError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise InputError(f"Adam betas must be in [0, 1), got {self.b1}, {self.b2}")
    if self.weight_decay < 0 or self.clip_norm < 0 or self.memory_budget_gb < 0:
      raise InputError("weight_decay, clip_norm and memory_budget_gb must be >= 0")
    if self.checkpoint_every < 0:
      raise InputError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
    if self.checkpoint_every and not self.checkpoint_dir:
      raise InputError("checkpoint_every needs a checkpoint_dir")

  @property
  def windows_per_step(self) -> int:
    return self.batch_size * self.accumulate
