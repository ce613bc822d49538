"""The composable API: Recipe / Rule serialization, rule resolution, and a mixed-precision recipe (GPTQ W3 g32
act-order on the MLP linears, GPTQ W4 per channel on attention, RTN W8 on ``lm_head`` of an untied model) run
from Python and from ``python -m qjax.quantize --recipe r.yaml`` with equal perplexity, saved and reloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qjax import api
from qjax.calibration import calibration_windows
from qjax.io import text as data
from qjax.evaluation import perplexity
from qjax.core import tree
from qjax.methods.activations.quantizers import ActQuantConfig
from qjax.core.errors import InputError
from qjax.methods import GPTQConfig, RTNConfig
from qjax.methods.kv import kivi
from qjax.core.formats.qarray import QArray
from qjax.io.hf import load_model

REPO = Path(__file__).resolve().parents[2]
MIXED = api.Recipe(weights=(
    api.Rule(r"model/layers_\d+/mlp/.*/weight", GPTQConfig(bits=3, group_size=32, act_order=True,
                                                          static_groups=True)),
    api.Rule(r"model/layers_\d+/self_attn/.*/weight", GPTQConfig(bits=4, act_order=True)),
    api.Rule(r"lm_head/weight", RTNConfig(bits=8))))
TEXT = ("Once upon a time, a little fox found a red ball in the tall grass. She rolled it down the hill, laughed, "
        "and ran after it. Her friend the owl watched from an old tree and said: be careful, the river is near! ") * 2


def test_recipe_round_trips_through_dicts_and_files(tmp_path):
  full = api.Recipe(weights=MIXED.weights + (api.Rule(r".*", None),), activations=ActQuantConfig(bits=8),
                    kv=kivi.KIVIConfig(bits=2, group_size=8, residual=32))
  for r in (MIXED, full, api.Recipe()):
    assert api.Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    for name in ("r.yaml", "r.json"):
      (tmp_path / name).write_text(api.dump_recipe(r, name))
      assert api.load_recipe(tmp_path / name) == r
  d = MIXED.to_dict()
  assert d["type"] == "qjax.Recipe" and d["version"] == 1
  assert d["weights"][2] == {"pattern": "lm_head/weight", "method": "rtn", "config": {"bits": 8}}
  for bad, words in [({**d, "version": 2}, "version"), ({**d, "type": "os.system"}, "not a qjax recipe"),
                     ({**d, "weights": [{"pattern": ".*", "method": "evil"}]}, "unknown method"),
                     ({**d, "weights": [{"pattern": ".*", "method": "rtn", "config": {"bitz": 3}}]}, "no field"),
                     ({**d, "extra": 1}, "unknown recipe entries")]:
    with pytest.raises(InputError, match=words):
      api.Recipe.from_dict(bad)
  with pytest.raises(InputError, match="bits"):
    api.Recipe.from_dict({**d, "weights": [{"pattern": ".*", "method": "rtn", "config": {"bits": 9}}]})


def test_rules_first_match_decides_and_typos_are_refused(llama_dir):
  model, params = load_model(llama_dir)
  paths = api.resolve_rules(params, MIXED.weights)
  assert isinstance(paths["lm_head/weight"], RTNConfig)
  assert paths["model/layers_0/mlp/down_proj/weight"].bits == 3
  assert paths["model/layers_1/self_attn/o_proj/weight"].bits == 4
  assert len(paths) == 2 * 7 + 1
  keep_attn = api.resolve_rules(params, (api.Rule(r".*/self_attn/.*", None), api.Rule(r".*", RTNConfig())))
  assert not any("self_attn" in p for p in keep_attn) and "lm_head/weight" in keep_attn
  with pytest.raises(InputError, match="matches no weight"):
    api.resolve_rules(params, (api.Rule(r".*/mlpp/.*", RTNConfig()),))
  with pytest.raises(InputError, match="lm_head"):
    api.resolve_rules(params, (api.Rule(r"lm_head/weight", GPTQConfig()),))
  with pytest.raises(InputError, match="calibration"):
    api.quantize_model(model, params, MIXED)


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
  return subprocess.run([sys.executable, "-m", "qjax.quantize", "--no-progress", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("tied", [False, True])
def test_embeddings_only_by_a_rule_that_names_them(llama_dir, stories_dir, tied):
  """A catch-all rule leaves the token embedding dense; a rule naming it quantizes it (RTN, any 2-D weight), and
  the model then looks rows up in the QArray (and, tied, projects with it): the same logits as the dense model
  holding the dequantized embedding."""
  import numpy as np
  model, params = load_model(stories_dir if tied else llama_dir)
  emb = "model/embed_tokens/weight"
  assert emb not in api.resolve_rules(params, (api.Rule(r".*", RTNConfig()),))
  q = api.quantize_model(model, params, api.Recipe(weights=(api.Rule(r"model/embed_tokens/weight",
                                                                     RTNConfig(bits=4, group_size=32)),)))
  qe = tree.flatten(q.params)[emb]
  assert isinstance(qe, QArray) and q.rules[0].bits_per_weight < 5
  ids = np.arange(40, dtype=np.int32).reshape(2, 20) % model.config.vocab_size
  np.testing.assert_array_equal(np.asarray(qe.take_rows(ids)), np.asarray(qe.dequantize())[ids])
  dense = tree.replace(q.params, [emb], lambda p, w: w.dequantize())
  np.testing.assert_allclose(np.asarray(q.model.apply(q.params, ids)[0]), np.asarray(model.apply(dense, ids)[0]),
                             rtol=1e-5, atol=1e-5)


def test_mixed_precision_recipe_python_cli_save_load(tmp_path, llama_dir):
  (tmp_path / "story.txt").write_text(TEXT)
  (tmp_path / "r.yaml").write_text(api.dump_recipe(MIXED, "r.yaml"))
  flags = ["--model", llama_dir, "--calib-text", tmp_path / "story.txt", "--nsamples", "8", "--calib-seqlen", "32",
           "--ppl-text", tmp_path / "story.txt", "--seqlen", "64", "--eval-nsamples", "4"]
  r = _cli(*flags, "--recipe", tmp_path / "r.yaml", "--save", tmp_path / "ck", "--json", tmp_path / "q.json",
           "--save-recipe", tmp_path / "again.json", "--export-gptq", tmp_path / "hf")
  assert r.returncode == 0, r.stderr
  # The HF GPTQ export holds every decoder linear: W3 g32 and W4 per channel as base + dynamic overrides.
  exp = json.loads((tmp_path / "q.json").read_text())["export_gptq"]
  assert exp["excluded"] == ["lm_head"] and len(exp["quantized"]) == 14 and len(exp["overrides"]) in (6, 8)
  assert "by per-module dynamic rules" in r.stdout
  # Python, the same calibration and evaluation tokens.
  model, params = load_model(llama_dir)
  tok = data.load_tokenizer(llama_dir)
  ids = data.tokenize(tok, TEXT)
  q = api.quantize_model(model, params, MIXED, calibration=calibration_windows(model, ids, 8, 32, seed=0))
  ppl = perplexity.perplexity(q.model, q.params, ids, 64, 4, progress=False).ppl
  out = json.loads((tmp_path / "q.json").read_text())
  assert out["ppl"]["story.txt"] == pytest.approx(ppl, rel=1e-6)
  fp = perplexity.perplexity(model, params, ids, 64, 4, progress=False).ppl
  assert abs(ppl / fp - 1) > 1e-4
  flat = tree.flatten(q.params)
  assert flat["lm_head/weight"].bits == 8 and flat["model/layers_0/mlp/up_proj/weight"].bits == 3
  assert flat["model/layers_0/self_attn/q_proj/weight"].group_size == -1
  assert not isinstance(flat["model/embed_tokens/weight"], QArray)
  bits = {r["pattern"]: r["bits_per_weight"] for r in out["rules"]}
  assert 3 < bits[MIXED.weights[0].pattern] < 4 < bits[MIXED.weights[1].pattern] < 5 < 8 < bits["lm_head/weight"]
  assert "bits / weight" in r.stdout and "lm_head/weight" in r.stdout and "gptq+rtn W8/4/3" in r.stdout
  # The checkpoint holds the recipe; --load reproduces the perplexity; --save-recipe wrote the same recipe.
  meta = json.loads((tmp_path / "ck" / "qjax.json").read_text())
  assert api.Recipe.from_dict(meta["recipe"]) == MIXED
  assert api.load_recipe(tmp_path / "again.json") == MIXED
  r2 = _cli("--load", tmp_path / "ck", "--ppl-text", tmp_path / "story.txt", "--seqlen", "64", "--eval-nsamples", "4",
            "--json", tmp_path / "l.json")
  assert r2.returncode == 0, r2.stderr
  assert json.loads((tmp_path / "l.json").read_text())["ppl"] == out["ppl"]
  # --recipe replaces the method flags: combining them is refused.
  r3 = _cli(*flags, "--recipe", tmp_path / "r.yaml", "--method", "rtn")
  assert r3.returncode == 2 and "--recipe replaces --method" in r3.stderr


def test_readme_recipe_file_is_the_python_recipe():
  """The README's YAML example loads, and is the README's Python recipe."""
  import re
  import yaml
  readme = (REPO / "README.md").read_text()
  block = re.search(r"```yaml\n(type: qjax.Recipe.*?)```", readme, re.S).group(1)
  want = api.Recipe(weights=MIXED.weights, kv=kivi.KIVIConfig(bits=2, group_size=32, residual=128))
  assert api.Recipe.from_dict(yaml.safe_load(block)) == want
