"""``python -m qjax.quantize``: quantize a LLaMA/OPT checkpoint, evaluate perplexity, save, summarize.

Example (the ``make demo`` run)::

    python -m qjax.quantize --method rtn --wbits 4 --groupsize 32 --baseline --ppl-datasets tinystories,wikitext2
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

from qjax import api
from qjax.calibration.training import TrainReport
from qjax.cli import activations as act_cli
from qjax.cli import common as cli
from qjax.cli import kv as kv_cli
from qjax.cli import recipe
from qjax.cli import weights as method_cli
from qjax.core import tree
from qjax.core.errors import InputError
from qjax.core.formats.nf4 import NF4LoRAArray
from qjax.evaluation import kernel_paths, perplexity, size, tasks
from qjax.io import assets, checkpoint, gguf_export, hf_gptq, lora_adapters, quantized
from qjax.io import text as data
from qjax.methods.qat import qlora
from qjax.methods.weights import gptq, spqr

PROG = "python -m qjax.quantize"
GPTQ_EXPORTABLE = ("rtn", "gptq", "awq", "llm_qat", "peqa", "l4q")   # methods whose results are QArrays


def build_parser() -> cli.Parser:
  p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0])
  cli.add_model_args(p)
  recipe.add_args(p)
  p.add_argument("--eval", default="ppl", choices=("ppl", "none"), help="evaluation to run")
  p.add_argument("--ppl-datasets",
                 help=f"comma-separated named texts ({', '.join(assets.PPL_DATASETS)}) or 'none' (default "
                      f"tinystories unless --ppl-text is given)")
  p.add_argument("--ppl-text", action="append", default=[], metavar="FILE", help="a text file to score (repeatable)")
  p.add_argument("--seqlen", type=int, help="perplexity window (default 2048 capped at the model context)")
  p.add_argument("--eval-nsamples", type=int, help="score only the first N windows")
  p.add_argument("--batch-size", type=int, help="windows per forward call (default: fits 256 MB of logits)")
  p.add_argument("--baseline", action="store_true", help="also evaluate the unquantized model")
  p.add_argument("--tasks", help="comma-separated zero-shot tasks run through lm-eval (needs the extra 'eval'): "
                                 + ", ".join(tasks.available()))
  p.add_argument("--limit", type=int, help="score only the first N items of each task")
  p.add_argument("--num-fewshot", type=int, help="few-shot examples per task item (default: the task's)")
  p.add_argument("--analyze-stats", metavar="DIR",
                 help="write per-linear input / weight statistics (CSV + PNG heatmaps) of the float model (outliers "
                      "planted, if asked) on 8 windows of the calibration text")
  p.add_argument("--layerwise-distance", metavar="DIR",
                 help="write per-linear SQNR / MSE of the quantized model's inputs and outputs against the float "
                      "model's (CSV + PNG) on one window of at most 512 tokens of the first evaluation text")
  p.add_argument("--save", help="write a qjax checkpoint folder (refuses an existing path)")
  p.add_argument("--export-gptq", metavar="DIR",
                 help="also write an HF GPTQ checkpoint (transformers / GPTQModel / vLLM); rtn, gptq, awq or the "
                      "QArray-producing QAT methods (llm_qat, peqa, l4q)")
  p.add_argument("--export-gguf", metavar="FILE",
                 help="also write a GGUF file (llama.cpp format): W4 g32 -> Q4_0/Q4_1, sym W8 g32 -> Q8_0 from "
                      "qjax's codes, other tensors dense")
  p.add_argument("--gguf-dense-type", default="F16", choices=("F16", "F32"),
                 help="GGUF type of the tensors no block type holds (default F16; norms are always F32)")
  p.add_argument("--save-adapters", metavar="DIR",
                 help="also write the LoRA adapters alone, PEFT layout (adapter_config.json + "
                      "adapter_model.safetensors); --method qlora")
  p.add_argument("--stream", action="store_true",
                 help="quantize a float safetensors folder or GGUF file layer by layer straight into --save "
                      "(layers read one at a time, each written when done: host memory ~ embeddings + one layer + "
                      "activations; gptq, spqr, awq or zeroquant; no evaluation: evaluate the output with --load)")
  p.add_argument("--resume", action="store_true",
                 help="with --stream: continue the interrupted run to the same --save (same model, recipe and "
                      "calibration) after its last finished layer")
  p.add_argument("--overwrite", action="store_true",
                 help="allow --save/--json/--export-*/--save-adapters to replace existing paths")
  p.add_argument("--json", help="write the results as JSON to this file")
  p.add_argument("--no-progress", action="store_true", help="hide progress bars")
  return p


def _texts(args) -> dict[str, Path]:
  out = {}
  datasets = args.ppl_datasets if args.ppl_datasets is not None else "none" if args.ppl_text else "tinystories"
  names = [] if datasets in ("", "none") else datasets.split(",")
  for name in names:
    out[name] = assets.named_text(name.strip(), assets.PPL_DATASETS)
  for f in args.ppl_text:
    if not Path(f).is_file():
      raise InputError(f"--ppl-text file {f} does not exist")
    out[Path(f).name] = Path(f)
  if args.eval == "ppl" and not out:
    raise InputError("--eval ppl needs at least one of --ppl-datasets / --ppl-text")
  return out


def _validate(args, given):
  model_config = cli.model_config(args)
  recipe.validate(args, given, model_config)
  single = [f for f in ("export_gguf", "export_gptq", "save_adapters", "analyze_stats", "layerwise_distance", "tasks",
                        "save_recipe") if getattr(args, f, None)]
  if args.num_processes > 1 and single:
    raise InputError(f"{', '.join(cli.flag(f) for f in single)}: not supported in a multi-process run (yet); run "
                     f"it on a checkpoint saved with --save")
  cli.check_scopes(given, [(("ppl_datasets", "ppl_text", "seqlen", "eval_nsamples", "batch_size"),
                            args.eval == "ppl", "--eval ppl"),
                           (("baseline",), args.eval == "ppl" or bool(args.tasks), "--eval ppl or --tasks")])
  if args.seqlen is not None and args.seqlen < 2:
    raise InputError(f"--seqlen must be at least 2, got {args.seqlen}")
  if args.eval_nsamples is not None and args.eval_nsamples < 1:
    raise InputError(f"--eval-nsamples must be positive, got {args.eval_nsamples}")
  if args.batch_size is not None and args.batch_size < 1:
    raise InputError(f"--batch-size must be positive, got {args.batch_size}")
  cli.check_scopes(given, [(("limit", "num_fewshot"), bool(args.tasks), "--tasks")])
  if args.tasks:
    tasks.check(args.tasks.split(","))
    if args.limit is not None and args.limit < 1:
      raise InputError(f"--limit must be positive, got {args.limit}")
    if importlib.util.find_spec("lm_eval") is None:
      raise InputError("--tasks needs lm-eval: pip install 'qjax[eval]'")
  if args.baseline and args.load:
    raise InputError("--baseline needs the unquantized model: use --model, not --load")
  if not args.load and args.method != "none" and hf_gptq.is_gptq_checkpoint(cli.model_dir(args)):
    raise InputError(f"{cli.model_dir(args)} is an HF GPTQ checkpoint (already quantized): evaluate it with "
                     f"--method none, or quantize its float source model")
  if args.save:
    checkpoint.check_destination(args.save, args.overwrite, "--save folder")
  if args.export_gptq:
    if not args.recipe and args.method not in GPTQ_EXPORTABLE:
      raise InputError(f"--export-gptq needs --method {', '.join(GPTQ_EXPORTABLE)} (QArray weights), or a --recipe "
                       f"with their rules")
    checkpoint.check_destination(args.export_gptq, args.overwrite, "--export-gptq folder")
  if args.export_gguf:
    checkpoint.check_destination(args.export_gguf, args.overwrite, "--export-gguf file")
    if model_config is not None:
      gguf_export.check_exportable(model_config)
  cli.check_scopes(given, [(("gguf_dense_type",), bool(args.export_gguf), "--export-gguf FILE")])
  if args.json:
    checkpoint.check_destination(args.json, args.overwrite, "--json file")
  if args.save_adapters:
    if args.method != "qlora":
      raise InputError("--save-adapters writes QLoRA's adapters: it needs --method qlora")
    checkpoint.check_destination(args.save_adapters, args.overwrite, "--save-adapters folder")
  for flag, dest in (("--analyze-stats", args.analyze_stats), ("--layerwise-distance", args.layerwise_distance)):
    if dest:
      checkpoint.check_destination(dest, args.overwrite, f"{flag} folder")


_NOT_STREAMED = ("load", "baseline", "tasks", "limit", "num_fewshot", "export_gptq", "export_gguf", "save_adapters",
                 "analyze_stats", "layerwise_distance", "ppl_datasets", "ppl_text", "seqlen", "eval_nsamples",
                 "batch_size", "kernel")


def _validate_stream(args, given):
  if not args.stream:
    if args.resume:
      raise InputError("--resume continues an interrupted --stream run: add --stream")
    return
  clash = [cli.flag(f) for f in _NOT_STREAMED if f in given] + (["--eval ppl"] if args.eval == "ppl" and "eval"
                                                                 in given else [])
  if clash:
    raise InputError(f"--stream only writes the checkpoint: {', '.join(clash)} cannot be combined with it "
                     f"(evaluate the output afterwards with --load DIR)")
  if not args.save:
    raise InputError("--stream writes the checkpoint layer by layer: give --save DIR")
  if args.num_processes > 1:
    raise InputError("--stream runs in one process (a --mesh over its devices is fine)")
  if getattr(args, "calib_dataset", None) == cli.GENERATED:
    raise InputError("--stream calibrates on a text: --calib-dataset generated needs the whole model")
  recipe.validate(args, given, cli.model_config(args))


def _run_stream(args, given) -> int:
  """``--stream``: :func:`qjax.io.streaming.quantize_streaming` of the flags' recipe, then the summary."""
  from qjax.io import streaming
  from qjax.models import CausalLM
  mesh = cli.setup_devices(args)
  config = cli.model_config(args)
  if config is None:
    raise InputError(f"--stream reads a safetensors folder or a GGUF file; {cli.model_source(args)} has no config.json")
  model = CausalLM(config, args.dtype, mesh=mesh)
  rec = recipe.from_flags(args, given, model, None)
  streaming.check_streamable(rec)
  tok = data.load_tokenizer(cli.model_dir(args))
  calib = method_cli.calibration_data(args, model, None, tok, args.seed, not args.no_progress)
  try:
    q, rep = streaming.quantize_streaming(cli.model_source(args), rec, calib.windows, args.save, dtype=args.dtype,
                                          mesh=mesh, resume=args.resume, overwrite=args.overwrite,
                                          layer_report=args.layer_report, progress=not args.no_progress)
  except KeyboardInterrupt:
    print(f"the finished layers are kept in {streaming.staging_dir(args.save)}: the same command with --resume "
          f"continues after them", file=sys.stderr)
    raise
  report = next(iter(q.reports.values()))
  n, seqlen = calib.windows.shape
  out = {"stream": rep.to_dict(), "calibration": {"nsamples": int(n), "seqlen": int(seqlen), **report.to_dict()},
         "rules": [r.to_dict() for r in q.rules], "recipe": rec.to_dict(),
         "timing": {"quantize_seconds": q.seconds, "compile_seconds": q.compile_seconds}}
  _print_calibration(out["calibration"], {p for _, p in model.family.linears})
  m = rep.memory
  print(cli.format_table(["streamed", "value"], [
      ["method", " + ".join(sorted({r.method or "float" for r in q.rules}))],
      ["checkpoint", str(rep.path)],
      ["layers", f"{config.num_layers} ({rep.resumed_layers} finished before this run)" if rep.resumed_layers
       else str(config.num_layers)],
      ["bits / quantized weight", " / ".join(f"{r.bits_per_weight:.3f}" for r in q.rules
                                             if r.bits_per_weight is not None)],
      ["estimated peak memory", f"{_mib(m.total_bytes)} (resident {_mib(m.resident_bytes)}, one layer "
                                f"{_mib(m.layer_bytes)}, activations {_mib(m.activation_bytes)})"],
      ["peak host memory (process)", _mib(report.peak_host_bytes)],
      ["quantize time", f"{q.seconds:.2f} s (of which compiling {q.compile_seconds:.2f} s)"]]))
  if args.json:
    cli.write_json(args.json, out)
  return 0


def _mib(n: int) -> str:
  return f"{n / 2**20:,.1f} MiB"


def run(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  given = cli.given_flags(parser, argv, args)
  _validate_stream(args, given)
  if args.stream:
    if args.json:
      checkpoint.check_destination(args.json, args.overwrite, "--json file")
    return _run_stream(args, given)
  _validate(args, given)
  texts = _texts(args) if args.eval == "ppl" else {}
  model, params, meta = cli.load_model(args)
  seqlen = args.seqlen or min(2048, model.config.max_position_embeddings)
  if seqlen > model.config.max_position_embeddings:
    raise InputError(f"--seqlen {seqlen} exceeds the model context ({model.config.max_position_embeddings})")
  tok = data.load_tokenizer(cli.model_dir(args))
  tokens = {}
  for name, path in texts.items():
    tokens[name] = data.tokenize(tok, data.read_text(path))
    if len(tokens[name]) < seqlen:  # fail before any long work
      raise InputError(f"text {name!r} ({path}) has {len(tokens[name])} tokens, fewer than one window of seqlen "
                       f"{seqlen}")
  source_dir = cli.model_dir(args)
  saved_kv = checkpoint.load_kv_calibration(args.load) if args.load else None
  q = recipe.apply(args, given, model, params, meta, tok, not args.no_progress, saved_kv)
  qparams, act, method = q.params, q.act, q.method

  def evaluate(m, p, tag):
    return {n: perplexity.perplexity(m, p, t, seqlen, args.eval_nsamples, args.batch_size,
                                     not args.no_progress, f"ppl {n} ({tag})") for n, t in tokens.items()}

  def run_tasks(m, p):
    from qjax.evaluation import harness
    lm = harness.LM(m, p, tok, progress=not args.no_progress)
    res = tasks.evaluate(lm, args.tasks.split(","), limit=args.limit, num_fewshot=args.num_fewshot)
    res.pop("raw")
    return res

  results = evaluate(q.model, qparams, "quantized" if q.quantized else "fp")
  baseline = evaluate(model, q.float_params, "fp") if args.baseline else {}
  task_results = run_tasks(q.model, qparams) if args.tasks else {}
  analyzed = _analyze(args, q, tok, tokens, seqlen)
  task_baseline = run_tasks(model, q.float_params) if args.tasks and args.baseline else {}
  if args.save:
    whole = dataclasses.replace(q.q, params=cli.host_params(q.q.params))   # every process gathers
    if cli.is_writer():
      quantized.save(whole, args.save, source_dir=source_dir, overwrite=args.overwrite, method=method)
  if args.save_recipe:
    with checkpoint.atomic_file(args.save_recipe) as f:
      f.write(api.dump_recipe(q.recipe, args.save_recipe))
  exported = _export_gptq(args, q.recipe, qparams, source_dir) if args.export_gptq else None
  gguf_out = (gguf_export.export_gguf(args.export_gguf, qparams, model, source=cli.model_source(args),
                                      overwrite=args.overwrite, dense_type=args.gguf_dense_type)
              if args.export_gguf else None)
  adapters = (lora_adapters.save_adapters(args.save_adapters, qparams, dropout=q.recipe.weights[0].config.dropout,
                                          base_model=str(source_dir), overwrite=args.overwrite)
              if args.save_adapters else None)
  rep = size.size_report(qparams)
  paths = kernel_paths.linear_paths(model, qparams, act.hooks().linear_input)
  head = kernel_paths.head_path(model, qparams)
  tps = {n: r.tokens_per_second for n, r in results.items()}
  out = {
      "ppl": {n: r.ppl for n, r in results.items()},
      "size": {"bits_per_weight": rep.bits_per_weight, "quantized_bytes": rep.quantized_bytes,
               "fp16_bytes": rep.fp16_bytes, "compression_ratio": rep.compression,
               "quantized_weights": rep.quantized_weights, "total_weights": rep.total_weights},
      "timing": {"quantize_seconds": None if q.loaded else q.seconds,
                 "compile_seconds": None if q.loaded else q.compile_seconds,
                 "eval_tokens_per_second": sum(tps.values()) / len(tps) if tps else None,
                 "eval_tokens_per_second_by_dataset": tps},
      "config": {**{k: v for k, v in vars(args).items() if k != "no_progress"}, "seqlen": seqlen,
                 "model_dir": str(source_dir), "method": method, "matmul_path": ", ".join(paths), "head_path": head,
                 "activations": act_cli.describe(act, method["name"]), "loaded": q.loaded},
      "protocol": perplexity.PROTOCOL,
  }
  if args.baseline:
    out["ppl_baseline"] = {n: r.ppl for n, r in baseline.items()}
  if analyzed:
    out["analysis"] = analyzed
  if task_results:
    out["tasks"] = task_results
    if task_baseline:
      out["tasks_baseline"] = task_baseline
  if "spqr" in q.q.reports:
    out["size"]["spqr"] = dataclasses.asdict(spqr.bits_summary(qparams))
  if q.q.rules:
    out["rules"] = [r.to_dict() for r in q.q.rules]
  out["recipe"] = q.recipe.to_dict()
  if exported is not None:
    out["export_gptq"] = exported
  if gguf_out is not None:
    out["export_gguf"] = gguf_out
  if adapters is not None:
    out["adapters"] = adapters
  if any(isinstance(v, NF4LoRAArray) for v in tree.flatten(qparams).values()):
    out["finetune_memory"] = qlora.memory_table(q.float_params, qparams)
  if q.kv is not None:
    out["kv_cache"] = {**q.kv.to_dict(), "describe": q.kv.describe(),
                       "semantics": "quantized past: each position attends to what the quantized cache holds when "
                                    "that token is decoded token by token",
                       **kv_cli.bytes_per_token(q.kv, model, seqlen)}
  if q.smooth_report is not None:
    out["smoothquant"] = {"seconds": q.smooth_report.seconds,
                          "layers": [{"layer": l.layer, **l.linear_losses} for l in q.smooth_report.layers]}
  if q.report is not None:
    windows = q.calibration.windows.shape
    part = "training" if isinstance(q.report, TrainReport) else "calibration"
    out[part] = {"nsamples": int(windows[0]), "seqlen": int(windows[1]), **q.report.to_dict()}
  if not cli.is_writer():
    return 0
  _print_summary(out, results, baseline, recipe.label(q, args), {p for _, p in model.family.linears})
  if args.json:
    cli.write_json(args.json, out)
  return 0


def _analyze(args, q, tok, tokens: dict, seqlen: int) -> dict:
  """``--analyze-stats`` and ``--layerwise-distance``: the files written, by tool."""
  from qjax.calibration import calibration_windows
  from qjax.evaluation import analysis
  out = {}
  if not (args.analyze_stats or args.layerwise_distance):
    return out
  calib = data.tokenize(tok, data.read_text(cli.calibration_text(args)))
  width = min(512, q.float_model.config.max_position_embeddings)
  if args.analyze_stats:
    rows = analysis.linear_stats(calibration_windows(q.float_model, calib, 8, width, args.seed), q.float_params,
                                 progress=not args.no_progress)
    with checkpoint.atomic_dir(args.analyze_stats) as tmp:
      files = analysis.write_stats(tmp, rows)
    out["stats"] = {k: str(Path(args.analyze_stats) / Path(v).name) for k, v in files.items()}
  if args.layerwise_distance:
    first = next(iter(tokens.values()), calib)
    window = first[:min(width, seqlen, len(first))][None].astype("int32")   # every linear's input and output held
    rows = analysis.layerwise_distance(q.float_model, q.float_params, q.model, q.params, window)
    with checkpoint.atomic_dir(args.layerwise_distance) as tmp:
      files = analysis.write_distance(tmp, rows)
    out["layerwise_distance"] = {k: str(Path(args.layerwise_distance) / Path(v).name) for k, v in files.items()}
  return out


def _export_gptq(args, recipe_, qparams, source_dir):
  """The HF GPTQ export of a run: base config and per-module overrides from the QArrays themselves; GPTQ's
  damping, static groups and sequential settings recorded when every GPTQ rule agrees on them."""
  gptqs = [r.config for r in recipe_.weights if isinstance(r.config, gptq.GPTQConfig)]
  extra = {}
  for key, field in (("damp_percent", "percdamp"), ("static_groups", "static_groups"),
                     ("true_sequential", "true_sequential")):
    values = {getattr(c, field) for c in gptqs}
    if len(values) == 1:
      extra[key] = values.pop()
  summary = hf_gptq.export_gptq(args.export_gptq, qparams, source_dir=source_dir,
                                desc_act=any(c.act_order for c in gptqs), overwrite=args.overwrite,
                                extra_config=extra or None)
  summary["path"] = str(summary["path"])
  return summary


def _print_calibration(c, linears):
  """The per-layer calibration table (linear losses summed; other per-layer figures, e.g. AWQ's alpha or LKD's
  MSE, one column each) and its totals."""
  keys = {k for l in c["layers"] for k in l["linear_losses"]}
  extra = sorted(keys - linears)
  summed = ["sum of losses"] if keys & linears else []
  errors = ["rel. output error"] if any(l["output_rel_error"] is not None for l in c["layers"]) else []
  print(cli.format_table(["layer", *errors, *summed, *extra, "seconds"], [
      [l["layer"], *[f"{l['output_rel_error']:.3e}" for _ in errors],
       *[f"{sum(v for k, v in l['linear_losses'].items() if k in linears):.4g}" for _ in summed],
       *[l["linear_losses"].get(k, "-") for k in extra], f"{l['seconds']:.2f}"] for l in c["layers"]]))
  print(f"calibration: {c['nsamples']} x {c['seqlen']} tokens, {c['seconds']:.1f} s, activations "
        f"{c['activation_bytes'] / 2**20:.1f} MiB, peak host memory {c['peak_host_bytes'] / 2**30:.2f} GiB\n")


def _print_summary(out, results, baseline, method, linears):
  """Tables: per-layer calibration (linear losses summed; other per-layer figures, e.g. AWQ's alpha or LKD's
  MSE, one column each), perplexity, size and paths."""
  if "training" in out:
    t = out["training"]
    mem = t["memory"]
    print(cli.format_table(["steps", "windows", "first loss", "last loss", "tokens", "train tok/s", "seconds",
                            "compile s", "est. memory GiB", "peak host GiB"], [[
        len(t["losses"]), f"{t['nsamples']} x {t['seqlen']}", f"{t['losses'][0]:.4f}", f"{t['losses'][-1]:.4f}",
        f"{t['tokens']:,}", f"{t['tokens_per_second']:,.0f}", f"{t['seconds']:.1f}", f"{t['compile_seconds']:.1f}",
        f"{mem['total'] / 2**30:.2f}", f"{t['peak_host_bytes'] / 2**30:.2f}"]]))
    if t["resumed_from"]:
      print(f"resumed from step {t['resumed_from']}")
    print()
  if "calibration" in out:
    _print_calibration(out["calibration"], linears)
  rows = []
  for n, r in results.items():
    b = baseline.get(n)
    rows.append([n, r.seqlen, len(r.nll), b.ppl if b else "-", r.ppl,
                 f"{(r.ppl / b.ppl - 1) * 100:+.2f}%" if b else "-", f"{r.tokens_per_second:,.0f}"])
  if rows:
    label = "ppl" if method == "none" else f"{method} ppl"
    print(cli.format_table(["dataset", "seqlen", "windows", "fp ppl", label, "delta", "eval tok/s"], rows))
    print()
  for tool, files in out.get("analysis", {}).items():
    print(f"{tool.replace('_', ' ')}: {', '.join(files.values())}")
  if "tasks" in out:
    fp = out.get("tasks_baseline", {})
    stderr = lambda k: k.replace(" (", "_stderr (") if " (" in k else k + "_stderr"
    cell = lambda r, k: (f"{r[k]:.4f} +- {r[stderr(k)]:.4f}" if isinstance(r.get(stderr(k)), float)
                         else f"{r[k]:.4f}") if k in r else "-"
    print(cli.format_table(["task", "metric", "fp", method if method != "none" else "model"], [
        [t, k, cell(fp[t], k) if t in fp else "-", cell(r, k)]
        for t, r in out["tasks"].items() for k in r if "_stderr" not in k]))
    print()
  s, t = out["size"], out["timing"]
  if len(out.get("rules", ())) > 1:
    print(cli.format_table(["rule", "method", "weights", "bits / weight"], [
        [r["pattern"], r["method"] or "float", r["weights"],
         "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"] for r in out["rules"]]))
    print()
  if "export_gptq" in out:
    print("\n".join(hf_gptq.summary_lines(out["export_gptq"])) + "\n")
  if "export_gguf" in out:
    print(gguf_export.summary_line(out["export_gguf"]) + "\n")
  if "finetune_memory" in out:
    m = out["finetune_memory"]
    print("fine-tuning memory (bytes; 16-bit weights and gradients, Adam: fp32 master + 2 moments per trainable "
          "parameter)")
    print(cli.format_table(["", "weights", "gradients", "optimizer", "total", "trainable params"], [
        [k, f"{v['weights']:,}", f"{v['gradients']:,}", f"{v['optimizer']:,}", f"{v['total']:,}",
         f"{v['trainable']:,} ({v['trainable'] / v['params']:.2%})"] for k, v in m.items()]))
    print()
  if "adapters" in out:
    a = out["adapters"]
    print(f"LoRA adapters: {a['adapters']} ({a['parameters']:,} parameters, {a['bytes'] / 2**20:.2f} MiB) -> "
          f"{a['path']}\n")
  print(cli.format_table(["model", "value"], [
      ["method", method],
      ["activations", out["config"]["activations"]],
      *([["KV cache", out["kv_cache"]["describe"]],
         ["KV cache bytes / token", f"{out['kv_cache']['bytes_per_token']:,.0f} (dense "
                                   f"{out['kv_cache']['dense_bytes_per_token']:,.0f})"]] if "kv_cache" in out else []),
      ["matmul path", out["config"]["matmul_path"]],
      ["output head path", out["config"]["head_path"]],
      ["fp16-equivalent bytes", f"{s['fp16_bytes']:,}"],
      ["quantized bytes", f"{s['quantized_bytes']:,}"],
      ["bits / quantized weight", f"{s['bits_per_weight']:.3f}"],
      *([["SpQR average bits (paper formula)", f"{s['spqr']['average_bits']:.3f}"],
         ["SpQR outliers", f"{s['spqr']['outliers']:,}"]] if "spqr" in s else []),
      ["compression vs fp16", f"{s['compression_ratio']:.2f}x"],
      ["quantize time", f"- (loaded {out['config']['loaded']}, quantized before this run)"
       if out["config"]["loaded"] else f"{t['quantize_seconds']:.2f} s (of which compiling "
                                        f"{t['compile_seconds']:.2f} s)"],
  ]))


def main(argv=None) -> int:
  return cli.run_guarded(run, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
