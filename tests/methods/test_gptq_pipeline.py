"""Whole-model GPTQ against an independent torch pipeline (``eval/torch_gptq.gptq_model``: the reference
``llama_sequential`` over the transformers model) on a random LLaMA whose widths (80, 200) are not multiples of
the group size 32: same calibration windows, same perplexity to float rounding, same per-layer losses."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import hf_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
from gptq_parity import qjax_run, torch_run  # noqa: E402


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory):
  return hf_reference.make_llama_checkpoint(tmp_path_factory.mktemp("odd-llama"), hidden_size=80,
                                            intermediate_size=200, num_hidden_layers=2)


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order+static"])
def test_whole_model_gptq_matches_torch_pipeline(odd_llama, act_order):
  rng = np.random.default_rng(0)
  windows = rng.integers(3, 128, size=(8, 64)).astype(np.int32)
  eval_tokens = rng.integers(3, 128, size=4 * 64).astype(np.int32)
  config = dict(bits=3, group_size=32, sym=False, act_order=act_order, static_groups=act_order,
                true_sequential=False)
  q = qjax_run(odd_llama, windows, eval_tokens, 64, None, config)
  t = torch_run(odd_llama, windows, eval_tokens, 64, None, config)
  np.testing.assert_allclose(q["layer_losses"], t["layer_losses"], rtol=1e-4)
  assert q["ppl"] == pytest.approx(t["ppl"], rel=1e-5)
  # Not trivially equal: the quantized model is measurably different from the float one.
  fp = hf_reference.torch_perplexity(odd_llama, eval_tokens, seqlen=64)
  assert abs(q["ppl"] / fp - 1) > 1e-3
