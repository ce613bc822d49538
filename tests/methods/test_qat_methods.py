"""The quantization-aware methods on stories260K: each lowers the perplexity of the text it trains on relative to
its RTN starting point, and trains only what the method says."""
import numpy as np
import pytest

from qjax.calibration import calibration_windows, training
from qjax.core import tree
from qjax.core.formats.qarray import QArray
from qjax.evaluation import perplexity
from qjax.io import assets, text as data
from qjax.io.hf import load_model
from qjax.methods.qat import l4q, objectives, peqa
from qjax.methods.qat.config import TrainConfig
from qjax.methods.weights import rtn


@pytest.fixture(scope="module")
def stories(stories_dir):
  model, params = load_model(stories_dir)
  tok = data.load_tokenizer(stories_dir)
  text = data.tokenize(tok, data.read_text(assets.named_text("tinystories", assets.CALIB_DATASETS)))
  calib = calibration_windows(model, text, 32, 128, 0)
  ppl = lambda p: perplexity.perplexity(model, p, text, 128, 16, progress=False).ppl
  return model, params, calib, ppl


TRAIN = TrainConfig(steps=20, lr=1e-3, warmup=2, batch_size=4)


def test_peqa_trains_only_the_scales_and_beats_rtn(stories):
  model, params, calib, ppl = stories
  cfg = peqa.PEQAConfig(bits=3, group_size=32, train=TRAIN)
  q, report = peqa.quantize(params, cfg, model=model, calibration=calib, progress=False)
  start = rtn.quantize(params, rtn.RTNConfig(bits=3, group_size=32), progress=False)[0]
  qf, sf = tree.flatten(q), tree.flatten(start)
  linears = [p for p, v in qf.items() if isinstance(v, QArray)]
  assert len(linears) == 7 * model.config.num_layers
  for p in linears:
    np.testing.assert_array_equal(np.asarray(qf[p].codes), np.asarray(sf[p].codes))     # frozen integers
    np.testing.assert_array_equal(np.asarray(qf[p].zero), np.asarray(sf[p].zero))
    assert qf[p].scale.dtype == np.float16 and not np.array_equal(np.asarray(qf[p].scale), np.asarray(sf[p].scale))
  assert report.losses[-1] < report.losses[0]
  assert ppl(q) < 0.9 * ppl(start)


@pytest.mark.parametrize("sym", [False, True])
def test_l4q_merges_into_a_qarray_that_beats_rtn(stories, sym):
  model, params, calib, ppl = stories
  cfg = l4q.L4QConfig(bits=3, group_size=32, sym=sym, rank=4, scale_dtype="float32", train=TRAIN)
  q, report = l4q.quantize(params, cfg, model=model, calibration=calib, progress=False)
  start = rtn.quantize(params, rtn.RTNConfig(bits=3, group_size=32, sym=sym, scale_dtype="float32"),
                       progress=False)[0]
  assert all(isinstance(v, QArray) and v.sym == sym for p, v in tree.flatten(q).items() if "layers_" in p
             and p.endswith("proj/weight"))
  assert report.losses[-1] < report.losses[0]
  assert ppl(q) < 0.9 * ppl(start)


def test_l4q_starts_at_rtn(stories):
  """Step 0 of L4Q (B = 0, MinMax steps) is RTN: its first loss is RTN's loss on the same windows."""
  model, params, calib, _ = stories
  cfg = l4q.L4QConfig(bits=3, group_size=32, rank=4, train=TrainConfig(steps=1, lr=1e-3, warmup=0, batch_size=4))
  _, report = l4q.quantize(params, cfg, model=model, calibration=calib, progress=False)
  start = rtn.quantize(params, rtn.RTNConfig(bits=3, group_size=32, scale_dtype="float32"), progress=False)[0]
  first = np.asarray(calib.windows)[training.window_order(0, calib.windows.shape[0], cfg.train)[0]]
  want = float(objectives.next_token_loss(model, start, first))
  assert report.losses[0] == pytest.approx(want, rel=1e-5)
