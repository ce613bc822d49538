"""Training objectives of the quantization-aware methods, and the activation memory they hold.

``tokens [B, T]`` int32 windows; the model runs on ``tokens[:, :-1]`` and position ``t`` predicts token ``t + 1``.
Losses are float32 means over the ``B (T - 1)`` predicted positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from qjax.core import tree
from qjax.core.errors import InputError
from qjax.methods.registry import as_assignment
from qjax.models import CausalLM


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of ``logits [B, T, vocab]`` (float32) against ``labels [B, T]``."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


def next_token_loss(model: CausalLM, params, tokens: jax.Array) -> jax.Array:
  """Cross-entropy of the next token (language modelling on a text: PEQA, L4Q)."""
  return cross_entropy(model.apply(params, tokens[:, :-1])[0], tokens[:, 1:])


def distill_loss(student: CausalLM, student_params, teacher: CausalLM, teacher_params, tokens: jax.Array):
  """``KL(p_teacher || p_student)`` of the next-token distributions (LLM-QAT's soft-label distillation, the
  teacher's logits computed on the fly without gradient)."""
  t = jax.lax.stop_gradient(teacher.apply(teacher_params, tokens[:, :-1])[0])
  s = student.apply(student_params, tokens[:, :-1])[0]
  p_t = jax.nn.softmax(t, axis=-1)
  return jnp.mean(jnp.sum(p_t * (jax.nn.log_softmax(t, axis=-1) - jax.nn.log_softmax(s, axis=-1)), axis=-1))


def activation_bytes(model: CausalLM, batch: int, seqlen: int) -> int:
  """A float32 estimate of what one micro-batch's backward pass holds: per decoder layer the residual stream,
  the norms' outputs, q/k/v/o, the attention probabilities (``heads * T^2``) and the MLP's three ``ffn``-wide
  activations; then the logits and their gradient (``2 * vocab`` per token)."""
  c = model.config
  per_token = c.num_layers * (6 * c.hidden_size + 2 * c.num_kv_heads * c.head_dim + 3 * c.intermediate_size
                              + c.num_heads * seqlen) + 2 * c.vocab_size
  return 4 * batch * seqlen * per_token


def one_config(params, rules, calibration, what: str):
  """``(assignment, config)`` of a QAT method's handler: the ``{path: config}`` of ``rules`` (one config per run:
  the methods register ``mixed=False``), after checking there are windows to train on."""
  if calibration is None:
    raise InputError(f"{what} trains on a text: pass calibration windows")
  assignment = as_assignment(params, rules)
  if not assignment:
    raise InputError(f"{what}: no weight matches the rules")
  return assignment, next(iter(assignment.values()))


def train_weights(params, frozen: dict, state: dict, weight, *, model: CausalLM, calibration, config, desc: str,
                  progress: bool):
  """Trains ``state`` (``{path: trainable pytree}``) where the model's weight at each path of ``frozen`` is
  ``weight(frozen[path], state[path])``, on next-token cross-entropy over ``calibration``'s windows; every other
  parameter of ``params`` stays fixed. Returns ``(state, TrainReport)``."""
  base = {p: v for p, v in tree.flatten(params).items() if p not in frozen}

  def loss_fn(state, fixed, tokens, key):
    weights = {p: weight(f, state[p]) for p, f in fixed["weights"].items()}
    return next_token_loss(model, tree.unflatten({**fixed["base"], **weights}), tokens)

  seqlen = calibration.windows.shape[1]
  return calibration.train(loss_fn, state, config, frozen={"weights": frozen, "base": base},
                           activation_bytes=activation_bytes(model, config.batch_size, seqlen - 1),
                           progress=progress, desc=desc)
