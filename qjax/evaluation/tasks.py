"""Offline zero-shot and few-shot tasks for the lm-evaluation-harness, read from the shared assets (``zeroshot/``).

Each task's lm-eval config is the harness's own YAML (read from the installed ``lm_eval/tasks/`` at run time:
prompt, choices, target, few-shot setup, filters and metrics), with only the data source replaced: the asset is
converted into the fields that definition expects and written, beside the config (``dataset_path: json``), into a
cache folder that :func:`evaluate` hands the harness as ``include_path``; nothing is downloaded
(``HF_DATASETS_OFFLINE=1`` holds). Task names carry a ``qjax_`` prefix (``qjax_piqa``) so they never shadow the
harness's hub-backed definitions.

* ``piqa`` (``piqa/piqa.yaml``): PIQA validation, 1,838 items, labels from ``valid-labels.lst``.
* ``arc_easy``, ``arc_challenge`` (``arc/arc_easy.yaml``, ``arc_challenge.yaml``): the ARC test sets (2,376 and
  1,170 items) in the ARC jsonl schema.
* ``hellaswag`` (``hellaswag/hellaswag.yaml``): validation, 10,042 items, from llama.cpp's text layout
  (``activity_label: ctx``, label, 4 endings) with the harness's ``preprocess``. One approximation: the harness
  capitalizes ``ctx_b`` (the context after ``ctx_a``), which the text layout does not mark; here the first letter
  after the context's last ``". "`` is upper-cased (the rest keeps its case, where ``str.capitalize`` lowers it).
* ``mmlu`` (``mmlu/default/``): the 57 subjects (14,042 test rows), 5-shot from each subject's ``dev`` rows (the
  harness's ``first_n`` sampler; ``--num-fewshot`` overrides), grouped as ``qjax_mmlu`` with the harness's
  size-weighted accuracy; per-subject results are in the raw output.
* ``gsm8k`` (``gsm8k/gsm8k-cot.yaml``): the test set (1,319 problems), the harness's 8-shot chain-of-thought
  exemplars (the assets hold no train split), greedy generation, strict and flexible exact match.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import os
import re
from pathlib import Path

import yaml

from qjax.core.errors import InputError
from qjax.io import assets


def _jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _piqa() -> dict[str, list[dict]]:
  root = assets.asset("zeroshot/piqa")
  docs = _jsonl(root / "valid.jsonl")
  labels = [int(x) for x in (root / "valid-labels.lst").read_text().split()]
  if len(labels) != len(docs):
    raise InputError(f"PIQA: {len(docs)} items but {len(labels)} labels in {root}")
  return {"test": [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y}
                   for d, y in zip(docs, labels)]}


def _arc(name: str):
  def load() -> dict[str, list[dict]]:
    out = []
    for d in _jsonl(assets.asset(f"zeroshot/arc/{name}-Test.jsonl")):
      ch = d["question"]["choices"]
      out.append({"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
                  "choices": {"text": [c["text"] for c in ch], "label": [c["label"] for c in ch]}})
    return {"test": out}
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


def _hellaswag() -> dict[str, list[dict]]:
  lines = bz2.decompress(assets.asset("zeroshot/hellaswag/hellaswag_val_full.txt.bz2").read_bytes()).decode()
  lines = lines.splitlines()
  if len(lines) % 6:
    raise InputError(f"HellaSwag text file has {len(lines)} lines, not 6 per task")
  out = []
  for k in range(0, len(lines), 6):
    ctx, label, *endings = lines[k:k + 6]
    out.append({"query": hellaswag_preprocess(_capitalize_last_sentence(ctx)),
                "choices": [hellaswag_preprocess(e) for e in endings], "label": int(label)})
  return {"test": out}


def _mmlu_subject(subject: str):
  def load() -> dict[str, list[dict]]:
    out = {}
    for split in ("test", "dev"):
      with open(assets.asset(f"zeroshot/mmlu/{split}/{subject}_{split}.csv"), newline="") as f:
        out[split] = [{"question": r["question"], "subject": subject,
                       "choices": [r[f"choice{i}"] for i in range(4)], "answer": int(r["answer"])}
                      for r in csv.DictReader(f)]
    return out
  return load


def _gsm8k() -> dict[str, list[dict]]:
  return {"test": [{"question": d["question"], "answer": d["answer"]}
                   for d in _jsonl(assets.asset("zeroshot/gsm8k/test.jsonl"))]}


def mmlu_subjects() -> tuple[str, ...]:
  """The 57 subjects of the assets (``zeroshot/mmlu/test/SUBJECT_test.csv``)."""
  return tuple(sorted(p.name.removesuffix("_test.csv") for p in assets.asset("zeroshot/mmlu/test").glob("*.csv")))


# name -> (converter, the harness's YAML (relative to lm_eval/tasks), fields that replace its data source)
_SPLITS = {"test_split": "test", "training_split": None, "validation_split": None}
TASKS = {
    "piqa": (_piqa, "piqa/piqa.yaml", _SPLITS),
    "arc_easy": (_arc("ARC-Easy"), "arc/arc_easy.yaml", _SPLITS),
    "arc_challenge": (_arc("ARC-Challenge"), "arc/arc_challenge.yaml", _SPLITS),
    "hellaswag": (_hellaswag, "hellaswag/hellaswag.yaml", _SPLITS),
    "mmlu": (None, "mmlu/default/_default_template_yaml", {**_SPLITS, "fewshot_split": "dev", "num_fewshot": 5}),
    "gsm8k": (_gsm8k, "gsm8k/gsm8k-cot.yaml", _SPLITS),
}
_DROPPED = ("include", "tag", "group", "dataset_name", "process_docs", "task_alias")


def available() -> tuple[str, ...]:
  return tuple(TASKS)


class _Loader(yaml.SafeLoader):
  """The harness's YAML with its ``!function`` tags read as None (the conversion replaces what they compute)."""


_Loader.add_constructor("!function", lambda loader, node: None)


def harness_config(rel: str) -> dict:
  """The installed harness's task YAML ``lm_eval/tasks/REL``, its ``include`` merged under it."""
  spec = importlib.util.find_spec("lm_eval")
  if spec is None:
    raise InputError("the lm-eval tasks need lm-eval: pip install 'qjax[eval]'")
  path = Path(list(spec.submodule_search_locations)[0]) / "tasks" / rel
  config = yaml.load(path.read_text(), Loader=_Loader)
  if "include" in config:
    config = {**harness_config(str(Path(rel).parent / config["include"])), **config}
  return config


def check(names) -> list[str]:
  """The task names, or InputError naming an unknown one and listing the available tasks."""
  names = [n.strip() for n in names if n.strip()]
  unknown = [n for n in names if n not in TASKS]
  if unknown or not names:
    raise InputError(f"unknown task {unknown[0] if unknown else '(none given)'!r}; available: {', '.join(TASKS)}")
  return names


def default_cache() -> Path:
  return Path(os.environ.get("QJAX_CACHE", Path.home() / ".cache" / "qjax")) / "lm_eval_tasks"


def _write(path: Path, text: str):
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def _task_config(task: str, base: str, overrides: dict, data: dict[str, Path], **extra) -> dict:
  config = {k: v for k, v in harness_config(base).items() if k not in _DROPPED}
  config.update({k: v for k, v in overrides.items() if v is not None})
  for k, v in overrides.items():
    if v is None:
      config.pop(k, None)
  return {**config, **extra, "task": task, "dataset_path": "json",
          "dataset_kwargs": {"data_files": {split: str(p) for split, p in data.items()}}}


def _emit(folder: Path, task: str, splits: dict[str, list[dict]], base: str, overrides: dict, **extra):
  data = {}
  for split, docs in splits.items():
    data[split] = folder / f"{task}.{split}.jsonl"
    _write(data[split], "".join(json.dumps(d) + "\n" for d in docs))
  _write(folder / f"{task}.yaml", yaml.safe_dump(_task_config(task, base, overrides, data, **extra),
                                                   sort_keys=False))


def prepare(names, cache_dir: Path | None = None) -> Path:
  """Converts the tasks ``names`` into ``cache_dir`` (per task its converted splits ``TASK.SPLIT.jsonl`` and its
  config ``TASK.yaml``, each written atomically; MMLU: one task per subject and the group ``qjax_mmlu``) and
  returns the folder to pass the harness as ``include_path``."""
  folder = Path(cache_dir or default_cache())
  folder.mkdir(parents=True, exist_ok=True)
  for name in check(names):
    load, base, overrides = TASKS[name]
    if name != "mmlu":
      _emit(folder, f"qjax_{name}", load(), base, overrides)
      continue
    subjects = mmlu_subjects()
    for subject in subjects:
      title = subject.replace("_", " ")
      _emit(folder, f"qjax_mmlu_{subject}", _mmlu_subject(subject)(), base, overrides,
            description=f"The following are multiple choice questions (with answers) about {title}.\n\n")
    group = {"group": "qjax_mmlu", "task": [f"qjax_mmlu_{s}" for s in subjects],
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
    _write(folder / "qjax_mmlu.yaml", yaml.safe_dump(group, sort_keys=False))
  return folder


def metrics(result: dict) -> dict[str, float]:
  """One task's harness metrics as ``{name: value}``: ``acc``, ``acc_stderr``, ...; a metric computed after a
  filter other than ``none`` is named ``metric (filter)`` (GSM8K: ``exact_match (strict-match)``)."""
  out = {}
  for key, value in result.items():
    if "," not in key or not isinstance(value, (int, float)):
      continue
    metric, filt = key.split(",", 1)
    out[metric if filt == "none" else f"{metric} ({filt})"] = value
  return out


def evaluate(lm, names, *, limit: int | None = None, num_fewshot: int | None = None,
             cache_dir: Path | None = None) -> dict:
  """``lm_eval.simple_evaluate`` of the harness model ``lm`` on the offline tasks ``names``; returns
  ``{task: metrics}`` (:func:`metrics`; names without the ``qjax_`` prefix; MMLU: the size-weighted group) and the
  harness's full result (per-subject MMLU included) under ``"raw"``."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  names = check(names)
  folder = prepare(names, cache_dir)
  res = lm_eval.simple_evaluate(model=lm, tasks=[f"qjax_{n}" for n in names], limit=limit,
                                num_fewshot=num_fewshot, task_manager=TaskManager(include_path=str(folder)),
                                log_samples=False)
  return {**{n: metrics(res["results"][f"qjax_{n}"]) for n in names}, "raw": res}
