"""The per-family placement map: column-parallel, row-parallel, vocabulary-split and replicated parameters."""
from __future__ import annotations

from qjax.models import CausalLM, ModelConfig
from qjax.models.sharding import wanted_spec


def _model(family):
  return CausalLM(ModelConfig.from_hf({"model_type": family, "hidden_size": 64, "intermediate_size": 128,
                                         "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256,
                                         "ffn_dim": 128, "max_position_embeddings": 64}))


def test_llama_map():
  m = _model("llama")
  assert wanted_spec(m, "model/layers_1/self_attn/q_proj/weight") == ("model", "data")
  assert wanted_spec(m, "model/layers_1/mlp/up_proj/weight") == ("model", "data")
  assert wanted_spec(m, "model/layers_0/self_attn/o_proj/weight") == ("data", "model")
  assert wanted_spec(m, "model/layers_0/mlp/down_proj/weight") == ("data", "model")
  assert wanted_spec(m, "model/embed_tokens/weight") == ("model", "data")
  assert wanted_spec(m, "lm_head/weight") == ("model", "data")
  assert wanted_spec(m, "model/layers_0/input_layernorm/weight") == ()
  assert wanted_spec(m, "model/norm/weight") == ()


def test_opt_map_biases_follow_their_outputs():
  m = _model("opt")
  assert wanted_spec(m, "model/decoder/layers_0/fc1/weight") == ("model", "data")
  assert wanted_spec(m, "model/decoder/layers_0/fc1/bias") == ("model",)
  assert wanted_spec(m, "model/decoder/layers_0/fc2/weight") == ("data", "model")
  assert wanted_spec(m, "model/decoder/layers_0/fc2/bias") == ("data",)
  assert wanted_spec(m, "model/decoder/layers_0/self_attn/out_proj/weight") == ("data", "model")
  assert wanted_spec(m, "model/decoder/layers_0/self_attn_layer_norm/weight") == ()
