"""The QAT trainer (:mod:`qjax.calibration.training`): it lowers the loss of a fake-quantized tiny LLaMA, a run
interrupted after a checkpoint resumes to exactly the uninterrupted run, and bad setups fail before any work."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qjax.calibration import training
from qjax.core import tree
from qjax.core.errors import InputError
from qjax.io.hf import load_model
from qjax.methods.qat import fake_quant
from qjax.methods.qat.config import TrainConfig
from qjax.models.families import DECODER_LINEARS


@pytest.fixture(scope="module")
def setup(llama_dir):
  model, params = load_model(llama_dir)
  paths = tree.matching(params, DECODER_LINEARS)
  windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (10, 16)).astype(np.int32)

  def loss_fn(p, frozen, tokens, key):
    fq = tree.replace(p, paths, lambda _, w: fake_quant.minmax_fake(w, 4, sym=False, group_size=16))
    logits = model.apply(fq, tokens[:, :-1])[0]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

  return params, windows, loss_fn


def _config(tmp_path=None, **kw):
  base = dict(steps=6, batch_size=2, accumulate=2, lr=3e-3, warmup=2, seed=3)
  if tmp_path is not None:
    base.update(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=3, log_path=str(tmp_path / "log.jsonl"))
  return TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss_and_logs_every_step(setup, tmp_path):
  params, windows, loss_fn = setup
  trained, report = training.train(loss_fn, params, windows, _config(tmp_path, steps=12), progress=False)
  assert len(report.losses) == 12 and report.losses[-1] < report.losses[0]
  lines = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
  assert [l["step"] for l in lines] == list(range(1, 13))
  assert [l["loss"] for l in lines] == list(report.losses)
  assert lines[0]["lr"] == 0.0 and lines[2]["lr"] == pytest.approx(3e-3)    # warmup, then the cosine
  assert tree.flatten(params).keys() == tree.flatten(trained).keys()
  assert report.tokens == 12 * 4 * 16 and report.memory["total"] > 0


def test_an_interrupted_run_resumes_exactly(setup, tmp_path, monkeypatch):
  params, windows, loss_fn = setup
  ref_params, ref = training.train(loss_fn, params, windows, _config(), progress=False)
  order = training.window_order

  def interrupt_at_step_4(k, n, config):
    if k == 4:
      raise KeyboardInterrupt
    return order(k, n, config)

  monkeypatch.setattr(training, "window_order", interrupt_at_step_4)
  with pytest.raises(KeyboardInterrupt):
    training.train(loss_fn, params, windows, _config(tmp_path), progress=False)
  monkeypatch.setattr(training, "window_order", order)
  assert len(open(tmp_path / "log.jsonl").readlines()) == 4        # steps 1-4 ran; the checkpoint holds 3
  resumed_params, resumed = training.train(loss_fn, params, windows, _config(tmp_path), progress=False)
  assert resumed.resumed_from == 3
  np.testing.assert_allclose(resumed.losses, ref.losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(resumed_params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert [json.loads(l)["step"] for l in open(tmp_path / "log.jsonl")] == list(range(1, 7))


def test_a_checkpoint_of_another_run_is_refused(setup, tmp_path):
  params, windows, loss_fn = setup
  training.train(loss_fn, params, windows, _config(tmp_path, steps=3), progress=False)
  with pytest.raises(InputError, match="another run .*config"):
    training.train(loss_fn, params, windows, _config(tmp_path, steps=3, seed=4), progress=False)


def test_the_memory_budget_is_checked_before_any_work(setup):
  params, windows, loss_fn = setup
  with pytest.raises(InputError, match="training needs about"):
    training.train(loss_fn, params, windows, _config(memory_budget_gb=1e-6), progress=False)


def test_window_order_visits_every_window_once_per_epoch():
  cfg = TrainConfig(steps=10, batch_size=3, accumulate=2, seed=1)
  seen = np.concatenate([training.window_order(k, 9, cfg).ravel() for k in range(3)])   # 18 = 2 epochs of 9
  assert sorted(seen[:9]) == list(range(9)) and sorted(seen[9:]) == list(range(9))
  assert not np.array_equal(seen[:9], seen[9:])
  np.testing.assert_array_equal(training.window_order(2, 9, cfg), training.window_order(2, 9, cfg))


@pytest.mark.parametrize("kw,msg", [(dict(steps=0), "steps"), (dict(warmup=-1), "warmup"),
                                    (dict(checkpoint_every=5), "checkpoint_dir"), (dict(lr=0.0), "learning rate")])
def test_train_config_validates_itself(kw, msg):
  with pytest.raises(InputError, match=msg):
    TrainConfig(**kw)


def test_a_qat_recipe_round_trips_with_its_nested_train_config(tmp_path):
  import qjax
  from qjax.methods.qat.peqa import PEQAConfig
  cfg = PEQAConfig(bits=3, group_size=32, train=TrainConfig(steps=7, lr=0.01, checkpoint_dir="ck", checkpoint_every=2))
  recipe = qjax.Recipe(weights=(qjax.Rule(".*/mlp/.*", cfg),))
  d = recipe.to_dict()
  assert d["weights"][0]["config"]["train"] == {"steps": 7, "lr": 0.01, "checkpoint_every": 2, "checkpoint_dir": "ck"}
  path = tmp_path / "r.yaml"
  path.write_text(qjax.dump_recipe(recipe, path))
  assert qjax.load_recipe(path) == recipe
  d["weights"][0]["config"]["train"]["steps"] = 0
  with pytest.raises(InputError, match="steps must be a positive integer"):
    qjax.Recipe.from_dict(d)
