"""The trainer of the quantization-aware methods: one jit-compiled optax step over token windows, resumable orbax
checkpoints of the whole train state, a JSON-lines log, a progress bar and a memory check up front.

A method hands :func:`train` a pure loss ``loss_fn(params, frozen, tokens [B, T] int32, key) -> float32 scalar``,
the trainable pytree ``params`` and the frozen pytree ``frozen`` (a teacher, frozen integer codes). Each optimizer
step ``k`` (0-based) averages the gradients of ``accumulate`` micro-batches (a ``lax.scan``), clips them to a
global norm, and applies AdamW with the warmup + cosine schedule of :class:`~qjax.methods.qat.config.TrainConfig`.
Which windows step ``k`` reads and its random key are pure functions of ``(seed, k)``: seeded epoch permutations
of the windows (:func:`window_order`) and ``fold_in(PRNGKey(seed), k)``; with the train state restored from a
checkpoint, a resumed run therefore takes exactly the steps an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from qjax.calibration.memory import available_bytes, peak_host_bytes
from qjax.core import timing
from qjax.core.errors import InputError
from qjax.core.progress import bar as progress_bar
from qjax.methods.qat.config import TrainConfig

LossFn = Callable[[object, object, jax.Array, jax.Array], jax.Array]
_NUMERIC = ("steps", "batch_size", "accumulate", "lr", "warmup", "final_lr_ratio", "b1", "b2", "weight_decay",
            "clip_norm", "seed")   # the TrainConfig fields a resumed run must share with the checkpoint


@dataclasses.dataclass(frozen=True)
class TrainReport:
  """What a training run did: per-step loss (mean over the step's windows), learning rate and gradient norm
  (before clipping) over the whole run, resumed steps included; ``seconds`` / ``tokens_per_second`` of the steps
  this process ran (compilation excluded from the rate, reported in ``compile_seconds``)."""
  losses: tuple[float, ...]
  learning_rates: tuple[float, ...]
  grad_norms: tuple[float, ...]
  seconds: float
  compile_seconds: float
  tokens_per_second: float
  tokens: int                      # tokens of the whole run (steps x windows per step x seqlen)
  resumed_from: int                # the step a checkpoint resumed from (0: a fresh run)
  memory: dict                     # the estimate checked up front (bytes per part)
  peak_host_bytes: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to ``lr`` over ``min(warmup, steps)`` steps, then a cosine to ``lr * final_lr_ratio``."""
  warmup = min(config.warmup, config.steps)
  if warmup == config.steps:
    return optax.linear_schedule(0.0, config.lr, config.steps)
  return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, config.steps,
                                            end_value=config.lr * config.final_lr_ratio)


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping (when ``clip_norm > 0``) then AdamW; weight decay on leaves of rank >= 2 only."""
  adamw = optax.adamw(schedule(config), b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                      mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p))
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw) if config.clip_norm else adamw


def window_order(step: int, n: int, config: TrainConfig) -> np.ndarray:
  """Window indices ``[accumulate, batch_size]`` of optimizer step ``step``: the run reads the concatenation of
  the permutations ``default_rng([seed, epoch]).permutation(n)``, ``windows_per_step`` indices per step."""
  per = config.windows_per_step
  start = step * per
  out, e = [], start // n
  while len(out) < per:
    perm = np.random.default_rng([config.seed, e]).permutation(n)
    lo = start - e * n if not out else 0
    out.extend(perm[lo:lo + per - len(out)].tolist())
    e += 1
  return np.asarray(out, np.int32).reshape(config.accumulate, config.batch_size)


def memory_estimate(params, frozen, activation_bytes: int) -> dict:
  """Bytes of training: the trainable parameters, their gradients and AdamW's two moments (float32 each, as
  held), the frozen tree, and ``activation_bytes`` (the method's estimate of one micro-batch's saved
  activations)."""
  nbytes = lambda t: sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(t))
  p = nbytes(params)
  parts = {"params": p, "gradients": p, "optimizer": 2 * sum(int(np.prod(x.shape)) * 4 for x in
                                                             jax.tree.leaves(params)),
           "frozen": nbytes(frozen), "activations": int(activation_bytes)}
  return {**parts, "total": sum(parts.values())}


def check_memory(estimate: dict, config: TrainConfig):
  """Raises InputError (before any work) when the estimate exceeds the budget."""
  budget = config.memory_budget_gb * 2**30 if config.memory_budget_gb else 0.8 * (available_bytes() or np.inf)
  if estimate["total"] > budget:
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in estimate.items() if k != "total")
    raise InputError(f"training needs about {estimate['total'] / 2**30:.2f} GiB ({parts} GiB), more than the "
                     f"{budget / 2**30:.2f} GiB budget: lower the batch size or the sequence length")


def _fingerprint(params, windows: np.ndarray, config: TrainConfig) -> dict:
  """What a checkpoint must match to be resumed: the numeric settings, the tree's shapes and the data."""
  shapes = jax.tree.map(lambda a: f"{jnp.dtype(a.dtype).name}{list(a.shape)}", params)
  return {"config": {k: getattr(config, k) for k in _NUMERIC},
          "params": hashlib.sha1(json.dumps(jax.tree_util.tree_flatten_with_path(shapes)[0],
                                            default=str).encode()).hexdigest(),
          "windows": hashlib.sha1(np.ascontiguousarray(windows).tobytes()).hexdigest()}


def _step_fn(loss_fn: LossFn, opt: optax.GradientTransformation, lr: optax.Schedule):
  def step(params, opt_state, frozen, batch, key, k):
    def micro(acc, xs):
      tokens, i = xs
      loss, g = jax.value_and_grad(loss_fn)(params, frozen, tokens, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, acc, (loss, g)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(batch.shape[0])))
    m = batch.shape[0]
    loss, grads = loss / m, jax.tree.map(lambda g: g / m, grads)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads), lr(k)

  return jax.jit(step, donate_argnums=(0, 1))


class _Checkpoints:
  """The run's orbax checkpoints: train state ``{params, opt_state}`` plus a JSON history (fingerprint and the
  per-step records so far), keyed by the number of finished steps."""

  def __init__(self, directory: str, fingerprint: dict):
    self.fingerprint = fingerprint
    self.mngr = ocp.CheckpointManager(Path(directory).absolute(),
                                      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def restore(self, state):
    """``(state, records)`` of the latest checkpoint, or ``(state, [])`` when there is none."""
    step = self.mngr.latest_step()
    if step is None:
      return state, []
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    got = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          history=ocp.args.JsonRestore()))
    hist = got.history
    if hist.get("fingerprint") != self.fingerprint:
      differ = [k for k in self.fingerprint if hist.get("fingerprint", {}).get(k) != self.fingerprint[k]]
      raise InputError(f"the checkpoint in {self.mngr.directory} is of another run (its {', '.join(differ)} "
                       f"differ): use another checkpoint folder")
    return jax.tree.map(jnp.asarray, got.state), hist["records"]

  def save(self, step: int, state, records):
    self.mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        history=ocp.args.JsonSave({"fingerprint": self.fingerprint, "records": records})), force=True)

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


def train(loss_fn: LossFn, params, windows: np.ndarray, config: TrainConfig, *, frozen=None,
          activation_bytes: int = 0, progress: bool = True, desc: str = "train"):
  """Trains ``params`` on ``windows [n, T]`` int32 for ``config.steps`` optimizer steps (module docstring).

  Returns ``(params, TrainReport)``. ``frozen`` is passed to ``loss_fn`` untouched (no gradient); the input
  trees are not modified. Raises InputError before any work when the memory estimate exceeds the budget or
  ``config.checkpoint_dir`` holds a checkpoint of a different run.
  """
  windows = np.asarray(windows, np.int32)
  n, seqlen = windows.shape
  estimate = memory_estimate(params, frozen, activation_bytes)
  check_memory(estimate, config)
  if progress:
    print(f"{desc}: memory estimate {estimate['total'] / 2**30:.2f} GiB (" + ", ".join(
        f"{k} {v / 2**20:.1f} MiB" for k, v in estimate.items() if k != "total") + ")", file=sys.stderr)
  opt, lr = optimizer(config), schedule(config)
  state = {"params": jax.tree.map(jnp.array, params), "opt_state": opt.init(params)}   # copies: the step donates
  frozen = jax.tree.map(jnp.asarray, frozen)          # on the device once, not transferred every step
  ckpt = _Checkpoints(config.checkpoint_dir, _fingerprint(params, windows, config)) if config.checkpoint_dir \
      else None
  records = []
  if ckpt is not None:
    state, records = ckpt.restore(state)
  start = len(records)
  log = _open_log(config.log_path, records)
  step_fn = _step_fn(loss_fn, opt, lr)
  key = jax.random.PRNGKey(config.seed)
  tokens_per_step = config.windows_per_step * seqlen
  bar = progress_bar(total=config.steps, desc=desc, enabled=progress)
  bar.update(start)
  t_run = time.perf_counter()
  try:
    with timing.compile_time() as compiled:
      for k in range(start, config.steps):
        t0 = time.perf_counter()
        batch = jnp.asarray(windows[window_order(k, n, config)])
        p, o, loss, gnorm, rate = step_fn(state["params"], state["opt_state"], frozen, batch,
                                          jax.random.fold_in(key, k), k)
        state = {"params": p, "opt_state": o}
        rec = {"step": k + 1, "loss": float(loss), "lr": float(rate), "grad_norm": float(gnorm),
               "tokens_per_second": tokens_per_step / (time.perf_counter() - t0)}
        records.append(rec)
        if log is not None:
          log.write(json.dumps(rec) + "\n")
          log.flush()
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_second']:.0f}")
        bar.update()
        if ckpt is not None and ((config.checkpoint_every and (k + 1) % config.checkpoint_every == 0)
                                 or k + 1 == config.steps):
          ckpt.save(k + 1, state, records)
  finally:   # an interrupted run keeps its finished checkpoints and log lines
    bar.close()
    if ckpt is not None:
      ckpt.close()
    if log is not None:
      log.close()
      plot_losses(records, Path(config.log_path).with_suffix(".png"))
  seconds = time.perf_counter() - t_run
  ran = config.steps - start
  rate = ran * tokens_per_step / max(seconds - compiled.seconds, 1e-9) if ran else 0.0
  report = TrainReport(tuple(r["loss"] for r in records), tuple(r["lr"] for r in records),
                       tuple(r["grad_norm"] for r in records), seconds, compiled.seconds, rate,
                       config.steps * tokens_per_step, start, estimate, peak_host_bytes())
  return state["params"], report


def _open_log(path, records):
  """The JSON-lines log, rewritten with the resumed records (so it matches the run after a resume)."""
  if path is None:
    return None
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  f = open(path, "w")
  for r in records:
    f.write(json.dumps(r) + "\n")
  return f


def plot_losses(records: list[dict], path: Path):
  """The loss curve of ``records`` (the log's lines) as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
