"""lm-eval parity and speed: the qjax adapter (``qjax.evaluation.harness.LM``) against lm-eval's own ``hf`` model
(transformers + torch, the same weights in float32) on the offline tasks, and against a direct transformers
computation of log-likelihoods.

1. Direct: the first ``--direct`` PIQA requests (context ``Question: {goal}\\nAnswer:``, continuation ``" " + sol``)
   scored by the adapter and by transformers (tokens as the harness splits them: continuation = the tail of the
   whole string's encoding; log-softmax of ``model(whole[:-1])`` at the continuation's positions, summed): the
   largest absolute difference of the summed log-probabilities and the number of ``is_greedy`` disagreements.
2. Tasks: ``lm_eval.simple_evaluate`` on ``--tasks`` with ``--limit`` items each, qjax adapter then the ``hf`` model
   (``batch_size`` equal), both on the same converted task files: acc / acc_norm of each, the number of items whose
   chosen answer differs (from the logged samples), wall seconds and requests per second, and the speed ratio.

Run on a quiet machine for the speed ratio (the JSON records the load average):
  JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python eval/harness_parity.py --model smollm2-135m
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppl import environment, log, torch_causal_lm  # noqa: E402  (eval/ is the script's folder)


def direct_loglikelihood(torch_model, tokenizer, pairs):
  """``[(sum log p(cont | ctx), is_greedy)]`` with transformers, tokens split as the harness does."""
  import torch
  out = []
  for ctx, cont in pairs:
    whole = tokenizer.encode(ctx + cont)
    n = len(whole) - len(tokenizer.encode(ctx))
    with torch.no_grad():
      logits = torch_model(torch.tensor([whole[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[-n:]
    target = torch.tensor(whole[-n:])
    out.append((float(logp[torch.arange(n), target].sum()), bool((logp.argmax(-1) == target).all())))
  return out


def chosen(samples):
  """``{doc_id: argmax choice}`` of a task's logged samples."""
  return {s["doc_id"]: max(range(len(s["resps"])), key=lambda i: float(s["resps"][i][0][0])) for s in samples}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--tasks", default="piqa,arc_easy,hellaswag")
  p.add_argument("--limit", type=int, default=500)
  p.add_argument("--direct", type=int, default=50)
  p.add_argument("--batch-size", type=int, default=8)
  args = p.parse_args(argv)

  import lm_eval
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager

  import qjax
  from qjax.evaluation import harness, tasks
  from qjax.io import assets

  names = tasks.check(args.tasks.split(","))
  loaded = qjax.load(args.model)
  ours = harness.LM(loaded.model, loaded.params, loaded.tokenizer, batch_size=args.batch_size, progress=False)
  torch_model = torch_causal_lm(str(assets.model_path(args.model)))
  theirs = HFLM(pretrained=torch_model, tokenizer=loaded.tokenizer, batch_size=args.batch_size, device="cpu")
  out = {"env": environment(model=args.model, limit=args.limit, batch_size=args.batch_size)}

  docs = tasks.TASKS["piqa"][0]()["test"]
  pairs = [(f"Question: {d['goal']}\nAnswer:", " " + d[s]) for d in docs for s in ("sol1", "sol2")][:args.direct]
  mine = ours.loglikelihood([Instance("loglikelihood", {}, a, i) for i, a in enumerate(pairs)])
  ref = direct_loglikelihood(torch_model, loaded.tokenizer, pairs)
  out["direct"] = {"requests": len(pairs), "max_abs_diff": max(abs(a[0] - b[0]) for a, b in zip(mine, ref)),
                   "greedy_disagreements": sum(a[1] != b[1] for a, b in zip(mine, ref))}
  log(f"direct: {out['direct']}")

  folder = tasks.prepare(names)
  runs = {}
  for who, lm in (("qjax", ours), ("hf", theirs)):
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=[f"qjax_{n}" for n in names], limit=args.limit,
                                  task_manager=TaskManager(include_path=str(folder)), log_samples=True)
    seconds = time.perf_counter() - t0
    requests = sum(len(s["resps"]) for n in names for s in res["samples"][f"qjax_{n}"])
    runs[who] = {"seconds": seconds, "requests": requests, "requests_per_second": requests / seconds,
                 "results": {n: {k.split(",")[0]: v for k, v in res["results"][f"qjax_{n}"].items() if "," in k}
                             for n in names},
                 "chosen": {n: chosen(res["samples"][f"qjax_{n}"]) for n in names}}
    log(f"{who}: {seconds:.1f} s, {requests} requests")
  out["tasks"] = {n: {"qjax": runs["qjax"]["results"][n], "hf": runs["hf"]["results"][n],
                      "items_with_different_choice": sum(runs["qjax"]["chosen"][n][d] != runs["hf"]["chosen"][n][d]
                                                         for d in runs["qjax"]["chosen"][n])} for n in names}
  out["speed"] = {w: {k: runs[w][k] for k in ("seconds", "requests", "requests_per_second")} for w in runs}
  out["speed"]["qjax_vs_hf"] = runs["qjax"]["requests_per_second"] / runs["hf"]["requests_per_second"]
  out["env"]["load_average_end"] = os.getloadavg()
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
