"""QLoRA on stories260K: a frozen NF4 base, adapters trained with dropout in bfloat16, the result saved whole and
its adapters on their own (PEFT layout), merged, and the 16-bit vs QLoRA memory table."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from qjax.calibration import calibration_windows
from qjax.core import tree
from qjax.core.errors import InputError
from qjax.core.formats.nf4 import NF4Array, NF4LoRAArray
from qjax.evaluation import perplexity
from qjax.io import assets, checkpoint, lora_adapters, text as data
from qjax.io.hf import load_model
from qjax.methods.qat import qlora
from qjax.methods.qat.config import TrainConfig


@pytest.fixture(scope="module")
def trained(stories_dir):
  model, params = load_model(stories_dir)
  tok = data.load_tokenizer(stories_dir)
  text = lambda table: data.tokenize(tok, data.read_text(assets.named_text("tinystories", table)))
  calib = calibration_windows(model, text(assets.CALIB_DATASETS), 64, 128, 0)
  cfg = qlora.QLoRAConfig(rank=8, train=TrainConfig(steps=30, lr=1e-3, warmup=2, batch_size=4))
  q, report = qlora.quantize(params, cfg, model=model, calibration=calib, progress=False)
  return model, params, cfg, q, report, text(assets.PPL_DATASETS)


def test_qlora_lowers_the_eval_perplexity_of_its_nf4_base(trained):
  model, params, cfg, q, report, ev = trained
  ppl = lambda p: perplexity.perplexity(model, p, ev, 128, 16, progress=False).ppl
  base = tree.replace(params, tree.matching(params, cfg.targets), lambda _, w: qlora.quantize_base(w, cfg))
  assert report.losses[-1] < report.losses[0]
  assert ppl(q) < 0.9 * ppl(base)
  flat, qflat = tree.flatten(base), tree.flatten(q)
  for p in tree.matching(params, cfg.targets):
    assert isinstance(qflat[p], NF4LoRAArray)
    np.testing.assert_array_equal(np.asarray(qflat[p].codes), np.asarray(flat[p].codes))    # the base is frozen
    assert float(jnp.abs(qflat[p].lora_b).max()) > 0                                          # B left zero


def test_the_adapter_branch_is_the_merged_weight_and_dropout_only_trains(trained):
  model, params, cfg, q, _, _ = trained
  ids = np.arange(24, dtype=np.int32)[None] % model.config.vocab_size
  flat = tree.flatten(q)
  bases = tree.unflatten({p: v.base() if isinstance(v, NF4LoRAArray) else v for p, v in flat.items()})
  adapters = {p: {"a": v.lora_a, "b": v.lora_b} for p, v in flat.items() if isinstance(v, NF4LoRAArray)}
  branch = qlora.adapted_logits(model, bases, adapters, ids, cfg)
  merged = model.apply(qlora.merge(q), ids)[0]
  np.testing.assert_allclose(np.asarray(branch), np.asarray(merged), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(model.apply(q, ids)[0]), np.asarray(merged), rtol=1e-5, atol=1e-5)
  drop = qlora.adapted_logits(model, bases, adapters, ids, cfg, jax.random.PRNGKey(0))
  assert float(jnp.abs(drop - branch).max()) > 0
  again = qlora.merge(q, requantize=True)
  assert all(type(v) is NF4Array for p, v in tree.flatten(again).items() if p in adapters)


def test_qlora_checkpoint_and_peft_adapter_round_trips(trained, tmp_path):
  model, params, cfg, q, _, _ = trained
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "config.json").write_text("{}")
  checkpoint.save(tmp_path / "ck", q, source_dir=tmp_path / "src", dtype="float32", method={"name": "qlora"})
  loaded, _ = checkpoint.load_params(tmp_path / "ck")
  ids = np.arange(16, dtype=np.int32)[None]
  np.testing.assert_array_equal(np.asarray(model.apply(loaded, ids)[0]), np.asarray(model.apply(q, ids)[0]))
  summary = lora_adapters.save_adapters(tmp_path / "adapter", q, dropout=cfg.dropout)
  n_linears = 7 * model.config.num_layers
  assert summary["adapters"] == n_linears
  conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert conf["r"] == 8 and conf["lora_alpha"] == 16.0 and conf["peft_type"] == "LORA"
  assert set(conf["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
  t = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
  assert a.shape == (8, model.config.hidden_size)
  onto_float = lora_adapters.load_adapters(tmp_path / "adapter", params)
  want = tree.flatten(q)["model/layers_0/self_attn/q_proj/weight"]
  got = tree.flatten(onto_float)["model/layers_0/self_attn/q_proj/weight"]
  w = params["model"]["layers_0"]["self_attn"]["q_proj"]["weight"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(w) + np.asarray(want.delta()), atol=1e-6)   # merged
  nf4 = tree.unflatten({p: v.base() if isinstance(v, NF4LoRAArray) else v for p, v in tree.flatten(q).items()})
  again = lora_adapters.load_adapters(tmp_path / "adapter", nf4)
  np.testing.assert_array_equal(np.asarray(model.apply(again, ids)[0]), np.asarray(model.apply(q, ids)[0]))
  with pytest.raises(InputError, match="no LoRA adapters"):
    lora_adapters.save_adapters(tmp_path / "none", params)


def test_memory_table_follows_the_slide_arithmetic(trained):
  model, params, cfg, q, _, _ = trained
  t = qlora.memory_table(params, q)
  n = sum(int(v.size) for v in tree.flatten(params).values())
  assert t["16-bit"]["total"] == 16 * n
  r = cfg.rank
  lin = [v for v in tree.flatten(q).values() if isinstance(v, NF4LoRAArray)]
  adapters = sum(r * (v.shape[0] + v.shape[1]) for v in lin)
  assert t["qlora"]["trainable"] == adapters and t["qlora"]["optimizer"] == 12 * adapters
  assert t["qlora"]["total"] < 0.3 * t["16-bit"]["total"]
