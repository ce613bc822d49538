"""The lm-eval adapter (``qjax.evaluation.harness.LM``) against lm-eval's own ``hf`` model (transformers + torch,
the same stories260K weights in fp32): per-request log-likelihoods and greedy flags, rolling log-likelihoods,
task accuracies on the offline tasks, and greedy ``generate_until``."""
from __future__ import annotations

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from qjax.core.errors import InputError  # noqa: E402
from qjax.evaluation import harness, tasks  # noqa: E402
from qjax.io.hf import load_model  # noqa: E402
from qjax.io.text import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def both(stories_dir):
  model, params = load_model(stories_dir)
  ours = harness.LM(model, params, load_tokenizer(stories_dir), batch_size=4, progress=False)
  theirs = HFLM(pretrained=str(stories_dir), device="cpu", dtype="float32", batch_size=4)
  return ours, theirs


def _requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_equals_the_hf_model(both):
  ours, theirs = both
  docs = tasks.TASKS["piqa"][0]()["test"][:12]
  args = [(f"Question: {d['goal']}\nAnswer:", " " + d[s]) for d in docs for s in ("sol1", "sol2")]
  args += [("", "Once upon a time"), ("Once upon a time there was a", " girl"), ("Lily ", "went home.")]
  a, b = ours.loglikelihood(_requests("loglikelihood", args)), theirs.loglikelihood(_requests("loglikelihood", args))
  # HF sums the float32 token log-probs in float32 (ours in float64): sums near -400 differ by ~1e-4 there, so the
  # bound is 1e-4 plus float32's relative summation error; an off-by-one position is off by whole nats.
  np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], rtol=1e-6, atol=1e-4)
  assert [g for _, g in a] == [g for _, g in b]
  assert any(g for _, g in a) and len({round(x, 3) for x, _ in a}) > 10    # informative: not all equal/False


def test_packed_rows_equal_scoring_each_request_alone(both):
  """Choices sharing a context are packed into one row (context once, each continuation seeing it and itself):
  the same scores as one request per call, also when the row has to split at ``max_length``."""
  ours, _ = both
  small = harness.LM(ours.model, ours.params, ours.tokenizer, batch_size=2, max_length=24, progress=False)
  ctx = ours.tok_encode("Once upon a time there was a little girl named Lily. She")
  conts = [ours.tok_encode(c) for c in (" A", " B", " went to the park and played.", " liked", " ran home fast")]
  reqs = [(None, ctx, c) for c in conts]
  for lm in (ours, small):
    packed = lm._loglikelihood_tokens(reqs)
    alone = [lm._loglikelihood_tokens([r])[0] for r in reqs]
    np.testing.assert_allclose([x for x, _ in packed], [x for x, _ in alone], rtol=0, atol=2e-5)
    assert [g for _, g in packed] == [g for _, g in alone]
  assert len(ours._pack(reqs)) == 1 and len(small._pack(reqs)) > 1


def test_rolling_loglikelihood_and_generation_equal_the_hf_model(both):
  ours, theirs = both
  text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. " * 12
  args = [(text,), ("The cat sat.",)]
  a = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", args))
  b = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", args))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  gen = [("Once upon a time", {"until": ["."], "max_gen_toks": 24}), ("Lily and Ben", {"until": ["\n"],
                                                                                         "max_gen_toks": 16})]
  ga, gb = ours.generate_until(_requests("generate_until", gen)), theirs.generate_until(_requests("generate_until",
                                                                                                 gen))
  assert ga == gb and all(ga)


def test_task_accuracies_equal_the_hf_model(both, tmp_path):
  ours, theirs = both
  names = ["piqa", "arc_easy", "hellaswag"]
  a = tasks.evaluate(ours, names, limit=10, cache_dir=tmp_path)
  b = tasks.evaluate(theirs, names, limit=10, cache_dir=tmp_path)
  for n in names:
    assert a[n]["acc"] == b[n]["acc"] and a[n]["acc_norm"] == b[n]["acc_norm"], n
    assert 0 <= a[n]["acc"] <= 1 and a[n]["acc_stderr"] > 0


def test_unknown_task_and_sampling_are_refused(both):
  with pytest.raises(InputError, match="available: piqa"):
    tasks.check(["piqa", "winogrande"])
  with pytest.raises(InputError, match="greedily"):
    both[0].generate_until(_requests("generate_until", [("x", {"do_sample": True})]))


def test_converted_tasks_have_the_harness_fields(tmp_path):
  """Every converted split holds what the harness's own YAML reads; the written configs are the harness's with
  the data source replaced (prompt, few-shot setup, filters and metrics unchanged)."""
  import yaml
  piqa, arc, hs = (tasks.TASKS[n][0]()["test"] for n in ("piqa", "arc_challenge", "hellaswag"))
  assert len(piqa) == 1838 and set(piqa[0]) == {"goal", "sol1", "sol2", "label"}
  assert len(arc) == 1170 and all(d["answerKey"] in d["choices"]["label"] for d in arc)
  assert len(hs) == 10042 and all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in hs)
  assert hs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"
  gsm = tasks.TASKS["gsm8k"][0]()["test"]
  assert len(gsm) == 1319 and all("####" in d["answer"] for d in gsm)
  assert len(tasks.mmlu_subjects()) == 57
  folder = tasks.prepare(["mmlu", "gsm8k", "arc_challenge"], tmp_path)
  rows = sum(len((folder / f"qjax_mmlu_{s}.test.jsonl").read_text().splitlines()) for s in tasks.mmlu_subjects())
  assert rows == 14042
  cfg = yaml.safe_load((folder / "qjax_mmlu_anatomy.yaml").read_text())
  assert cfg["num_fewshot"] == 5 and cfg["fewshot_split"] == "dev" and cfg["doc_to_choice"] == ["A", "B", "C", "D"]
  assert cfg["description"].startswith("The following are multiple choice questions (with answers) about anatomy")
  g = yaml.safe_load((folder / "qjax_gsm8k.yaml").read_text())
  assert g["num_fewshot"] == 8 and len(g["fewshot_config"]["samples"]) == 8 and g["output_type"] == "generate_until"
  assert {f["name"] for f in g["filter_list"]} == {"strict-match", "flexible-extract"}
  a = yaml.safe_load((folder / "qjax_arc_challenge.yaml").read_text())
  assert a["doc_to_text"] == "Question: {{question}}\nAnswer:" and "dataset_name" not in a and a["test_split"] == "test"


def test_mmlu_and_gsm8k_run(both, tmp_path):
  """5-shot MMLU (the size-weighted group) and 8-shot chain-of-thought GSM8K (generation, both filters) on a few
  items: stories260K scores them (at chance), through the same adapter."""
  r = tasks.evaluate(both[0], ["mmlu", "gsm8k"], limit=1, cache_dir=tmp_path)
  assert 0 <= r["mmlu"]["acc"] <= 1 and len([k for k in r["raw"]["results"] if k.startswith("qjax_mmlu_")]) == 57
  assert {"exact_match (strict-match)", "exact_match (flexible-extract)"} <= set(r["gsm8k"])


def test_cli_tasks_with_baseline_and_json(tmp_path):
  """``--tasks`` through the command line: the fp and quantized accuracies side by side, in the JSON too; an
  unknown task is a one-line error with exit status 2."""
  import json
  import subprocess
  import sys
  from pathlib import Path
  env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
         "QJAX_CACHE": str(tmp_path / "cache")}
  repo = Path(__file__).resolve().parents[2]
  run = lambda *a: subprocess.run([sys.executable, "-m", "qjax.quantize", *map(str, a)], cwd=repo, env=env,
                                  capture_output=True, text=True, timeout=600)
  p = run("--method", "rtn", "--wbits", "3", "--groupsize", "32", "--eval", "none", "--tasks", "piqa,arc_challenge",
          "--limit", "6", "--baseline", "--no-progress", "--json", tmp_path / "t.json")
  assert p.returncode == 0, p.stderr
  out = json.loads((tmp_path / "t.json").read_text())
  assert set(out["tasks"]) == set(out["tasks_baseline"]) == {"piqa", "arc_challenge"}
  assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(out["tasks"]["piqa"])
  assert "acc_norm" in p.stdout and "rtn W3" in p.stdout
  bad = run("--tasks", "piqa,mmlu_pro", "--eval", "none")
  assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "available: piqa" in bad.stderr
