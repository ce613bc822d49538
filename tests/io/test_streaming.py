"""Streaming quantization (qjax.io.streaming) against the in-memory pipeline: the same checkpoint arrays, layer
parts written one at a time, an interrupted run resumed to the identical result, and the refusals."""
from __future__ import annotations

import json

import hf_reference
import numpy as np
import pytest

import qjax
from qjax.core import tree
from qjax.core.deferred import is_deferred
from qjax.core.errors import InputError
from qjax.io import checkpoint, hf, quantized, streaming
from qjax.methods import AWQConfig, GPTQConfig, RTNConfig, SpQRConfig, ZeroQuantConfig
from qjax.methods.activations.smoothquant import SmoothQuantConfig

WINDOWS = np.random.default_rng(0).integers(0, 128, (8, 32)).astype(np.int32)


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
  """4 layers, sharded safetensors (so the reader follows the index)."""
  return hf_reference.make_llama_checkpoint(tmp_path_factory.mktemp("deep"), num_hidden_layers=4,
                                            max_shard_size="60KB")


def _recipe(model, config):
  return qjax.Recipe(weights=(qjax.Rule(model.family.linear_pattern, config),))


def _arrays(path):
  params, meta = checkpoint.load_params(path)
  flat = {}
  for p, v in tree.flatten(params).items():
    leaves = [v] if not hasattr(v, "dequantize") else [a for a in vars(v).values() if hasattr(a, "shape")]
    flat.update({f"{p}#{k}": np.asarray(a) for k, a in enumerate(leaves)})
  return flat, meta


def _same(a, b):
  fa, ma = _arrays(a)
  fb, mb = _arrays(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
  assert ma["qarrays"] == mb["qarrays"] and ma["parts"] == mb["parts"]


@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=16, act_order=True),
                                    AWQConfig(bits=4, group_size=16),
                                    ZeroQuantConfig(bits_mlp=4, group_size=16, lkd=True, lkd_steps=3),
                                    SpQRConfig(bits=3, group_size=16, qq_groupsize=16)],
                         ids=["gptq", "awq", "zeroquant-lkd", "spqr"])
def test_streaming_writes_what_the_in_memory_pipeline_writes(deep_dir, tmp_path, config):
  model, params = hf.load_model(deep_dir)
  recipe = _recipe(model, config)
  q = qjax.quantize_model(model, params, recipe, calibration=qjax.Calibration(model, WINDOWS))
  quantized.save(q, tmp_path / "memory", source_dir=deep_dir)
  qs, rep = streaming.quantize_streaming(deep_dir, recipe, WINDOWS, tmp_path / "stream", progress=False)
  est = rep.memory
  assert rep.resumed_layers == 0 and rep.path == tmp_path / "stream"
  _same(tmp_path / "memory", tmp_path / "stream")
  flat = tree.flatten(qs.params)
  layer_leaves = [v for p, v in flat.items() if p.startswith("model/layers_")]
  assert layer_leaves and all(is_deferred(v) for v in layer_leaves)          # never all in memory
  assert not any(is_deferred(v) for p, v in flat.items() if not p.startswith("model/layers_"))
  w = "model/layers_2/mlp/down_proj/weight"
  np.testing.assert_array_equal(np.asarray(flat[w].load().dequantize()),
                                np.asarray(tree.flatten(q.params)[w].dequantize()))
  assert [r.bits_per_weight for r in qs.rules] == [r.bits_per_weight for r in q.rules]
  assert est.layer_bytes > 0 and est.total_bytes > est.resident_bytes + 2 * est.layer_bytes
  assert not streaming.staging_dir(tmp_path / "stream").exists()
  assert sorted(p.name for p in (tmp_path / "stream" / "layers").iterdir()) == ["0", "1", "2", "3"]


class _Killed(Exception):
  pass


@pytest.mark.parametrize("config", [GPTQConfig(bits=3, group_size=16, act_order=True),
                                    SpQRConfig(bits=3, group_size=16, qq_groupsize=16)], ids=["gptq", "spqr"])
def test_an_interrupted_run_resumes_to_the_identical_checkpoint(deep_dir, tmp_path, monkeypatch, config):
  """(SpQR: the resumed run propagates through the stored SpQRArrays, the original through their dense
  reconstructions; the two must agree bit for bit.)"""
  model, _ = hf.load_model(deep_dir)
  recipe = _recipe(model, config)
  streaming.quantize_streaming(deep_dir, recipe, WINDOWS, tmp_path / "whole", progress=False)
  write = streaming.StagedLayers.write

  def dies_after_layer_1(self, i, layer, report):
    if i == 2:
      raise _Killed
    return write(self, i, layer, report)

  monkeypatch.setattr(streaming.StagedLayers, "write", dies_after_layer_1)
  with pytest.raises(_Killed):
    streaming.quantize_streaming(deep_dir, recipe, WINDOWS, tmp_path / "resumed", progress=False)
  stage = streaming.staging_dir(tmp_path / "resumed")
  assert not (tmp_path / "resumed").exists()
  assert sorted(json.loads((stage / "stream.json").read_text())["layers"]) == ["0", "1"]
  with pytest.raises(InputError, match="--resume"):
    streaming.quantize_streaming(deep_dir, recipe, WINDOWS, tmp_path / "resumed", progress=False)
  with pytest.raises(InputError, match="different recipe"):
    streaming.quantize_streaming(deep_dir, _recipe(model, GPTQConfig(bits=4, group_size=16)), WINDOWS,
                                 tmp_path / "resumed", resume=True, progress=False)
  monkeypatch.setattr(streaming.StagedLayers, "write", write)
  seen = []
  monkeypatch.setattr(streaming.StagedLayers, "write", lambda self, i, *a: (seen.append(i), write(self, i, *a))[1])
  q, rep = streaming.quantize_streaming(deep_dir, recipe, WINDOWS, tmp_path / "resumed", resume=True, progress=False)
  assert seen == [2, 3] and rep.resumed_layers == 2        # layers 0 and 1 were not quantized again
  assert [r.layer for r in next(iter(q.reports.values())).layers] == [0, 1, 2, 3]
  _same(tmp_path / "whole", tmp_path / "resumed")
  assert not stage.exists()


def test_streaming_refuses_what_it_cannot_do_before_writing(deep_dir, tmp_path):
  model, _ = hf.load_model(deep_dir)
  cases = [(_recipe(model, RTNConfig(bits=4)), "layer-wise calibrated"),
           (qjax.Recipe(smoothquant=SmoothQuantConfig(0.5), weights=_recipe(model, GPTQConfig()).weights),
            "SmoothQuant")]
  for recipe, msg in cases:
    with pytest.raises(InputError, match=msg):
      streaming.quantize_streaming(deep_dir, recipe, WINDOWS, tmp_path / "out", progress=False)
  with pytest.raises(InputError, match="nothing to resume"):
    streaming.quantize_streaming(deep_dir, _recipe(model, GPTQConfig()), WINDOWS, tmp_path / "out", resume=True,
                                 progress=False)
  with pytest.raises(InputError, match="memory budget"):
    streaming.quantize_streaming(deep_dir, _recipe(model, GPTQConfig()), WINDOWS, tmp_path / "out",
                                 memory_budget_gb=1e-6, progress=False)
  assert list(tmp_path.iterdir()) == []


def test_a_gguf_source_streams_layer_by_layer(stories_dir, tmp_path, monkeypatch):
  """stories260K written as a float GGUF (every tensor F32), streamed: the same arrays as
  the in-memory run on the GGUF's own dequantized weights, the layers left in the file until reached."""
  from qjax.io import gguf_export, gguf_load
  model, params = hf.load_model(stories_dir)
  src = tmp_path / "fp.gguf"
  gguf_export.export_gguf(src, params, model, source=stories_dir, dense_type="F32")
  gm, lazy = gguf_load.load_model(src, stream=True)
  kinds = {p: type(v).__name__ for p, v in tree.flatten(lazy).items()}
  assert kinds["model/layers_3/mlp/up_proj/weight"] == "GGUFTensor" and kinds["model/norm/weight"] == "ArrayImpl"
  recipe = _recipe(gm, GPTQConfig(bits=4, group_size=32))
  windows = np.random.default_rng(1).integers(0, 512, (8, 64)).astype(np.int32)
  gm, gparams = hf.load_model(src)
  q = qjax.quantize_model(gm, gparams, recipe, calibration=qjax.Calibration(gm, windows))
  quantized.save(q, tmp_path / "memory", source_dir=src)
  opened = []
  open_reader = gguf_load.open_reader
  monkeypatch.setattr(gguf_load, "open_reader", lambda path: (opened.append(path), open_reader(path))[1])
  streaming.quantize_streaming(src, recipe, windows, tmp_path / "stream", progress=False)
  _same(tmp_path / "memory", tmp_path / "stream")
  assert len(opened) <= gm.config.num_layers + 3       # the header parsed once per layer, not once per tensor
