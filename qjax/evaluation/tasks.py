"""Offline zero-shot tasks for the lm-evaluation-harness, read from the shared assets (``zeroshot/``).

Each task is converted at run time into the fields the harness's own task definition expects (so its prompt,
choices and metrics are the standard ones) and written, with an lm-eval task YAML pointing at the converted file
(``dataset_path: json``), into a cache folder that :func:`task_manager` hands the harness as ``include_path``;
nothing is downloaded (``HF_DATASETS_OFFLINE=1`` holds). Task names are the harness's with a ``qjax_`` prefix
(``qjax_piqa``), so they never shadow its hub-backed definitions.

* ``piqa``: PIQA validation (1,838 items; labels from ``valid-labels.lst``); the harness's ``piqa`` prompt
  ``Question: {goal}\\nAnswer:`` over ``[sol1, sol2]``, acc and acc_norm.
* ``arc_easy``, ``arc_challenge``: the ARC test sets in the ARC jsonl schema, the harness's ``arc_*`` fields
  (``question``, ``choices {text, label}``, ``answerKey``) and prompt.
* ``hellaswag``: HellaSwag validation (10,042 items) from llama.cpp's text layout (``activity_label: ctx``, label,
  4 endings), the harness's ``preprocess`` applied. One approximation: the harness capitalizes ``ctx_b`` (the
  context after ``ctx_a``), which the text layout does not mark; here the first letter after the context's last
  ``". "`` is upper-cased (the rest of ``ctx_b`` keeps its case, where ``str.capitalize`` would lower it).
"""
from __future__ import annotations

import bz2
import json
import os
import re
from pathlib import Path

import yaml

from qjax.core.errors import InputError
from qjax.io import assets

_MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
               {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def _jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _piqa() -> list[dict]:
  root = assets.asset("zeroshot/piqa")
  docs = _jsonl(root / "valid.jsonl")
  labels = [int(x) for x in (root / "valid-labels.lst").read_text().split()]
  if len(labels) != len(docs):
    raise InputError(f"PIQA: {len(docs)} items but {len(labels)} labels in {root}")
  return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(docs, labels)]


def _arc(name: str):
  def load() -> list[dict]:
    out = []
    for d in _jsonl(assets.asset(f"zeroshot/arc/{name}-Test.jsonl")):
      ch = d["question"]["choices"]
      out.append({"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
                  "choices": {"text": [c["text"] for c in ch], "label": [c["label"] for c in ch]}})
    return out
  return load


def hellaswag_preprocess(text: str) -> str:
  """The harness's HellaSwag ``preprocess``: strip, WikiHow ``[title]`` artifacts, bracketed tags, double spaces."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def _capitalize_last_sentence(ctx: str) -> str:
  cut = ctx.rfind(". ")
  i = 0 if cut < 0 else cut + 2
  return ctx[:i] + ctx[i:i + 1].upper() + ctx[i + 1:]


def _hellaswag() -> list[dict]:
  lines = bz2.decompress(assets.asset("zeroshot/hellaswag/hellaswag_val_full.txt.bz2").read_bytes()).decode()
  lines = lines.splitlines()
  if len(lines) % 6:
    raise InputError(f"HellaSwag text file has {len(lines)} lines, not 6 per task")
  out = []
  for k in range(0, len(lines), 6):
    ctx, label, *endings = lines[k:k + 6]
    out.append({"query": hellaswag_preprocess(_capitalize_last_sentence(ctx)),
                "choices": [hellaswag_preprocess(e) for e in endings], "label": int(label)})
  return out


_ARC = {"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}"}
TASKS = {
    "piqa": (_piqa, {"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
                     "doc_to_choice": "{{[sol1, sol2]}}"}),
    "arc_easy": (_arc("ARC-Easy"), _ARC),
    "arc_challenge": (_arc("ARC-Challenge"), _ARC),
    "hellaswag": (_hellaswag, {"doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices"}),
}


def available() -> tuple[str, ...]:
  return tuple(TASKS)


def check(names) -> list[str]:
  """The task names, or InputError naming an unknown one and listing the available tasks."""
  names = [n.strip() for n in names if n.strip()]
  unknown = [n for n in names if n not in TASKS]
  if unknown or not names:
    raise InputError(f"unknown task {unknown[0] if unknown else '(none given)'!r}; available: {', '.join(TASKS)}")
  return names


def default_cache() -> Path:
  return Path(os.environ.get("QJAX_CACHE", Path.home() / ".cache" / "qjax")) / "lm_eval_tasks"


def prepare(names, cache_dir: Path | None = None) -> Path:
  """Converts the tasks ``names`` into ``cache_dir`` (one ``NAME.jsonl`` and ``NAME.yaml`` each, written
  atomically) and returns the folder to pass the harness as ``include_path``."""
  folder = Path(cache_dir or default_cache())
  folder.mkdir(parents=True, exist_ok=True)
  for name in check(names):
    load, fields = TASKS[name]
    data = folder / f"qjax_{name}.jsonl"
    config = {"task": f"qjax_{name}", "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "output_type": "multiple_choice", **fields, "metric_list": _MC_METRICS, "metadata": {"version": 1.0}}
    for path, text in ((data, "".join(json.dumps(d) + "\n" for d in load())),
                       (folder / f"qjax_{name}.yaml", yaml.safe_dump(config, sort_keys=False))):
      tmp = path.with_suffix(path.suffix + ".tmp")
      tmp.write_text(text)
      tmp.replace(path)
  return folder


def evaluate(lm, names, *, limit: int | None = None, num_fewshot: int | None = None,
             cache_dir: Path | None = None) -> dict:
  """``lm_eval.simple_evaluate`` of the harness model ``lm`` on the offline tasks ``names``; returns
  ``{task: {metric: value, metric_stderr: value}}`` (names without the ``qjax_`` prefix) and the harness's full
  result under ``"raw"``."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  folder = prepare(names, cache_dir)
  res = lm_eval.simple_evaluate(model=lm, tasks=[f"qjax_{n}" for n in check(names)], limit=limit,
                                num_fewshot=num_fewshot, task_manager=TaskManager(include_path=str(folder)),
                                log_samples=False, bootstrap_iters=1000)
  table = {}
  for task, metrics in res["results"].items():
    clean = {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
    table[task.removeprefix("qjax_")] = clean
  return {**table, "raw": res}
