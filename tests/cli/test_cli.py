"""End-to-end tests of ``python -m qjax.quantize``: every test drives the CLI in a subprocess.

Each subprocess pays a few seconds of JAX/transformers import and XLA compilation, so the runs are launched
together from one module fixture (:func:`runs`) on a small thread pool and the tests only inspect the finished
results. Only the runs needed by the selected tests are launched (``-k`` on one test stays quick).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_reference import torch_perplexity
from qjax.io import assets
from qjax.io.hf import load_model

REPO = Path(__file__).resolve().parents[2]
STORIES = assets.asset(assets.DEFAULT_MODEL)
FAST = ["--seqlen", "64", "--eval-nsamples", "2", "--no-progress"]
TIMEOUT = 600

# A few hundred characters of printable ASCII: with the char tokenizer of hf_reference, 1 token per char plus
# a BOS, i.e. 4 full windows of 64 tokens (the CLI scores the first 2).
TEXT = ("Once upon a time, a little fox found a red ball in the tall grass. She rolled it down the hill, "
        "laughed, and ran after it. Her friend the owl watched from an old tree and said: be careful, "
        "the river is near! The fox stopped, picked up the ball, and they played together until the sun "
        "went down.\n")
assert len(TEXT) + 1 >= 4 * 64


def _env() -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
             TOKENIZERS_PARALLELISM="false")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  return env


def _cli(env, *args) -> subprocess.CompletedProcess:
  """``python -m qjax.quantize ARGS`` from the repository root."""
  cmd = [sys.executable, "-m", "qjax.quantize", *map(str, args)]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _hashes(folder: Path) -> dict[str, str]:
  """Everything under ``folder``: relative path -> sha256 of a file's bytes, or "dir"."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
          for p in sorted(folder.rglob("*"))}


_SMALL_CHECKPOINT = {}


def _damaged_checkpoint(case: str, dest: Path):
  """A qjax checkpoint of stories260K with RTN W4 (written once in-process, then copied) damaged as ``case``
  says: arrays missing under params/, qjax.json not JSON, a quantized type naming a foreign module or an unknown
  type."""
  from qjax.io import checkpoint
  from qjax.methods.weights import rtn
  if "src" not in _SMALL_CHECKPOINT:
    src = dest.parent.parent / "small-checkpoint"
    model, params = load_model(STORIES)
    checkpoint.save(src, rtn.quantize(params, rtn.RTNConfig(bits=4, group_size=32), progress=False)[0],
                    source_dir=STORIES, dtype="float32", method={"name": "rtn", "config": {}})
    _SMALL_CHECKPOINT["src"] = src
  shutil.copytree(_SMALL_CHECKPOINT["src"], dest)
  meta = json.loads((dest / "qjax.json").read_text())
  first = sorted(meta["qarrays"])[0]
  if case == "checkpoint_arrays_missing":
    victims = [p for p in (dest / "params").rglob("*") if p.is_file() and p.stat().st_size > 1000]
    for p in victims:
      p.unlink()
  elif case == "checkpoint_json_invalid":
    (dest / "qjax.json").write_text('{"format": "qjax-checkpoint-v1", "dtype": ')
  elif case == "checkpoint_foreign_module":
    meta["qarrays"][first]["module"] = "os.path"
    (dest / "qjax.json").write_text(json.dumps(meta))
  elif case == "checkpoint_unknown_type":
    meta["qarrays"][first]["type"] = "MyArray"
    (dest / "qjax.json").write_text(json.dumps(meta))


def _with_bad_value(src: Path, dst: Path, value: float) -> str:
  """Copies the checkpoint ``src`` to ``dst`` and puts one ``value`` into a decoder weight of its
  ``model.safetensors``; returns that tensor's name."""
  from safetensors import safe_open
  from safetensors.numpy import save_file
  shutil.copytree(src, dst)
  f = dst / "model.safetensors"
  with safe_open(str(f), framework="numpy") as fh:
    meta = fh.metadata()
    tensors = {k: fh.get_tensor(k) for k in fh.keys()}
  key = "model.layers.1.mlp.down_proj.weight"
  w = tensors[key].copy()
  w[3, 5] = value
  tensors[key] = w
  save_file(tensors, str(f), metadata=meta)
  return key


# --------------------------------------------------------------------------------------------------------------
# Bad input: name -> (CLI arguments, words the one-line message must contain). "{t}" is the case's scratch folder
# (holding the prepared inputs), "{llama}" the random LLaMA checkpoint. Every case also passes --save/--json
# targets inside {t} (unless it names its own) and checks that nothing appears.
BAD = {
    "model_missing": (["--model", "{t}/no-such-model"], ["no-such-model", "does not exist"]),
    "no_config": (["--model", "{t}/empty"], ["config.json"]),
    "unsupported_model_type": (["--model", "{t}/gpt2"], ["gpt2", "llama", "opt"]),
    "wbits_1": (["--method", "rtn", "--wbits", "1"], ["--wbits", "1"]),
    "wbits_9": (["--method", "rtn", "--wbits", "9"], ["--wbits", "9"]),
    "groupsize_0": (["--method", "rtn", "--groupsize", "0"], ["--groupsize", "0"]),
    "groupsize_-2": (["--method", "rtn", "--groupsize", "-2"], ["--groupsize", "-2"]),
    "nan_weights": (["--model", "{t}/nan", "--method", "rtn"], ["down_proj", "nan"]),
    "inf_weights": (["--model", "{t}/inf", "--method", "rtn"], ["down_proj", "inf"]),
    "text_shorter_than_window": (["--model", "{llama}", "--ppl-text", "{t}/short.txt", "--ppl-datasets", "none"],
                                 ["64", "window"]),
    "save_exists": (["--save", "{t}/existing"], ["existing", "already exists", "--overwrite"]),
    "ppl_text_missing": (["--ppl-text", "{t}/no-such.txt"], ["no-such.txt", "does not exist"]),
    "unknown_dataset": (["--ppl-datasets", "tinystories,no_such_set"], ["no_such_set", "tinystories"]),
    "load_not_a_checkpoint": (["--load", str(STORIES)], ["not a qjax checkpoint"]),
    "batch_size_negative": (["--batch-size", "-1"], ["--batch-size", "-1"]),
    "seqlen_beyond_context": (["--seqlen", "4096"], ["4096", "context", "512"]),
    "static_groups_without_groups": (["--method", "gptq", "--static-groups"], ["--static-groups", "groupsize"]),
    "qq_groupsize_not_dividing": (["--method", "spqr", "--groupsize", "16", "--qq-groupsize", "16"],
                                  ["--qq-groupsize", "16", "172"]),
    "calib_text_missing": (["--method", "gptq", "--calib-text", "{t}/no-calib.txt"], ["no-calib.txt", "does not exist"]),
    "abits_1": (["--abits", "1"], ["--abits", "1"]),
    "act_groupsize_without_abits": (["--act-groupsize", "16"], ["--act-groupsize", "--abits"]),
    "int8_kernel_needs_a8": (["--method", "rtn", "--wbits", "8", "--int8-kernel"], ["--int8-kernel", "--abits 8"]),
    "int8_kernel_needs_w8": (["--method", "rtn", "--abits", "8", "--int8-kernel"], ["--int8-kernel", "--wbits 8"]),
    "llm_int8_with_abits": (["--method", "llm_int8", "--abits", "8"], ["LLM.int8", "--abits"]),
    "smoothquant_alpha": (["--method", "rtn", "--wbits", "8", "--smoothquant", "--alpha", "1.5"], ["--alpha", "1.5"]),
    "zeroquant_grouped_activations": (["--method", "zeroquant", "--abits", "8", "--act-groupsize", "16"],
                                      ["ZeroQuant", "--act-groupsize"]),
    "lkd_layers_not_integers": (["--method", "zeroquant", "--zq-lkd", "--lkd-layers", "0,x"], ["--lkd-layers", "0,x"]),
    "lkd_layer_out_of_range": (["--method", "zeroquant", "--zq-lkd", "--lkd-layers", "7"], ["7", "5 layers"]),
    "kivi_group_not_dividing_head_dim": (["--kv-method", "kivi", "--kv-group-size", "16", "--kv-residual", "32"],
                                         ["16", "head_dim", "8"]),
    "kivi_residual_not_multiple": (["--kv-method", "kivi", "--kv-group-size", "8", "--kv-residual", "12"],
                                   ["residual", "8", "12"]),
    "kvquant_bits_5": (["--kv-method", "kvquant", "--kv-bits", "5"], ["KVQuant", "5"]),
    "plant_too_many_outliers": (["--plant-outliers", "100"], ["100", "outlier", "64"]),
    "calib_too_short": (["--method", "gptq", "--calib-text", "{t}/short.txt", "--calib-seqlen", "64"],
                        ["calibration text", "--calib-seqlen", "64", "default"]),
    # Damaged inputs (issue 9: items 2, 3).
    "safetensors_truncated": (["--model", "{t}/truncated"], ["model.safetensors", "truncated"]),
    "safetensors_bad_header": (["--model", "{t}/badheader"], ["model.safetensors", "damaged"]),
    "checkpoint_arrays_missing": (["--load", "{t}/ckpt"], ["params/", "cannot be read"]),
    "checkpoint_json_invalid": (["--load", "{t}/ckpt"], ["qjax.json", "damaged"]),
    "checkpoint_foreign_module": (["--load", "{t}/ckpt"], ["os.path", "not one of qjax"]),
    "checkpoint_unknown_type": (["--load", "{t}/ckpt"], ["MyArray", "unknown quantized tensor type"]),
    # Outputs that cannot be written: refused up front, before loading (item 4).
    "save_unwritable": (["--save", "/sys/qjax-test/ckpt"], ["--save", "/sys", "cannot be written"]),
    "json_unwritable": (["--json", "/sys/qjax-test.json"], ["--json", "cannot be written"]),
    "export_unwritable": (["--method", "rtn", "--export-gptq", "/sys/qjax-gptq"], ["--export-gptq", "cannot be written"]),
    "save_below_a_file": (["--save", "{t}/file.txt/ckpt"], ["file.txt", "not a folder"]),
    # Flags that would be accepted and do nothing (items 5-7).
    "kv_bits_without_kv_method": (["--kv-bits", "2"], ["--kv-bits", "--kv-method"]),
    "act_order_with_rtn": (["--method", "rtn", "--act-order"], ["--act-order", "gptq"]),
    "static_groups_with_spqr": (["--method", "spqr", "--groupsize", "16", "--static-groups"],
                                ["--static-groups", "--method gptq"]),
    "nsamples_with_rtn": (["--method", "rtn", "--nsamples", "8"], ["--nsamples", "calibrates"]),
    "groupsize_wider_than_rows": (["--method", "rtn", "--groupsize", "1024"], ["1024", "64", "per channel"]),
    "wbits_without_method": (["--wbits", "3"], ["--wbits", "--method"]),
    "alpha_without_smoothquant": (["--method", "rtn", "--alpha", "0.7"], ["--alpha", "--smoothquant"]),
    "smoothquant_alone": (["--smoothquant"], ["--smoothquant", "only rescales", "--method", "--abits"]),
    "kivi_flag_with_kvquant": (["--kv-method", "kvquant", "--kv-residual", "64"], ["--kv-residual", "kivi"]),
    # Misleading messages (items 8, 15).
    "kivi_group_not_dividing_head_dim_default_residual": (["--kv-method", "kivi", "--kv-group-size", "3"],
                                                          ["3", "head_dim", "8"]),
    "ppl_text_empty": (["--ppl-text", "{t}/empty.txt"], ["empty.txt", "is empty"]),
}
# Cases that need the random checkpoints (they are built while the other runs are already going).
NEEDS_CHECKPOINTS = {"unsupported_model_type", "nan_weights", "inf_weights", "text_shorter_than_window",
                     "safetensors_truncated", "safetensors_bad_header"}
DAMAGED_CHECKPOINTS = {"checkpoint_arrays_missing", "checkpoint_json_invalid", "checkpoint_foreign_module",
                       "checkpoint_unknown_type"}
# Test function -> the runs it reads (bad-input tests read their own case).
NEEDS = {
    "test_rtn_w4g32_with_baseline_and_json": ["stories"],
    "test_save_then_load_gives_the_same_ppl": ["stories", "load"],
    "test_random_llama_end_to_end_with_overwrite": ["llama"],
    "test_random_opt_end_to_end": ["opt"],
}


def _wanted(request) -> set[str]:
  wanted = set()
  for item in request.session.items:
    if getattr(item, "module", None) is not sys.modules[__name__]:
      continue
    if item.originalname == "test_bad_input":
      wanted.add("bad:" + item.callspec.params["case"])
    wanted.update(NEEDS.get(item.originalname, ()))
  return wanted


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
  """Launches the CLI runs the selected tests need; returns ``(futures by run name, context dict)``."""
  root = tmp_path_factory.mktemp("cli")
  env = _env()
  wanted = _wanted(request)
  ctx = {"root": root}
  # One worker more than cores: the --load task blocks its worker (not a core) until the --save run is done.
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(6, (os.cpu_count() or 2) + 1))
  futures = {}

  def submit(name, fn, *args):
    if name in wanted:
      futures[name] = pool.submit(fn, *args)

  def bad(case):
    t = root / f"bad-{case}"
    args, _ = BAD[case]
    argv = [a.format(t=t, llama=ctx.get("llama")) for a in args]
    save = [] if "--save" in argv else ["--save", t / "out"]
    js = [] if "--json" in argv else ["--json", t / "out.json"]
    ctx[f"files-before:{case}"] = _hashes(t)
    return _cli(env, *FAST, *argv, *save, *js)  # case arguments win over the defaults

  # The longest chain first: stories260K RTN W4 g32 with --baseline --json --save, then --load of that save.
  if {"stories", "load"} & wanted:
    wanted.add("stories")
    ctx["stories_hashes_before"] = _hashes(STORIES)
    sdir = root / "stories"
    sdir.mkdir()
    ctx["stories_dir"] = sdir
    submit("stories", _cli, env, "--method", "rtn", "--wbits", "4", "--groupsize", "32", "--baseline", *FAST,
           "--json", sdir / "rtn.json", "--save", sdir / "ckpt")

  # Bad input that needs no random checkpoint.
  for case in BAD:
    t = root / f"bad-{case}"
    t.mkdir()
    if case == "no_config":
      (t / "empty").mkdir()
      (t / "empty" / "model.safetensors").write_bytes(b"")
    if case == "calib_too_short":
      (t / "short.txt").write_text("Once upon a time.")
    if case == "save_exists":
      (t / "existing").mkdir()
      (t / "existing" / "keep.txt").write_text("keep me")
    if case == "save_below_a_file":
      (t / "file.txt").write_text("a file, not a folder")
    if case == "ppl_text_empty":
      (t / "empty.txt").write_text("")
    if case in DAMAGED_CHECKPOINTS and "bad:" + case in wanted:
      _damaged_checkpoint(case, t / "ckpt")
    if case not in NEEDS_CHECKPOINTS:
      submit("bad:" + case, bad, case)

  # --load of the stories save (queued behind the run it waits for, which is the first one to start).
  def load():
    first = futures["stories"].result()
    if first.returncode != 0:
      pytest.fail(f"the --save run failed:\n{first.stderr}")
    sdir = ctx["stories_dir"]
    return _cli(env, "--load", sdir / "ckpt", *FAST, "--json", sdir / "load.json")
  submit("load", load)

  # The random HF checkpoints of conftest (built here, while the first runs are going, unless another module
  # already did).
  if wanted & {"llama", "opt"} or any("bad:" + c in wanted for c in NEEDS_CHECKPOINTS):
    ctx["llama"] = request.getfixturevalue("llama_dir")
    ctx["opt"] = request.getfixturevalue("opt_dir")
    ctx["text"] = root / "story.txt"
    ctx["text"].write_text(TEXT)
    for name in ("llama", "opt"):
      ctx[f"{name}_hashes_before"] = _hashes(ctx[name])
    t = root / "bad-unsupported_model_type"
    shutil.copytree(ctx["llama"], t / "gpt2")
    cfg = json.loads((t / "gpt2" / "config.json").read_text())
    (t / "gpt2" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    for case, value in (("nan_weights", math.nan), ("inf_weights", math.inf)):
      t = root / f"bad-{case}"
      ctx[f"poisoned:{case}"] = _with_bad_value(ctx["llama"], t / case.split("_")[0], value)
    (root / "bad-text_shorter_than_window" / "short.txt").write_text(TEXT[:40])
    for case, folder, damage in (("safetensors_truncated", "truncated", lambda b: b[: len(b) // 2]),
                                 ("safetensors_bad_header", "badheader", lambda b: b[:8] + b"{not json" + b[17:])):
      t = root / f"bad-{case}"
      shutil.copytree(ctx["llama"], t / folder)
      f = t / folder / "model.safetensors"
      f.write_bytes(damage(f.read_bytes()))
    for case in sorted(NEEDS_CHECKPOINTS):
      submit("bad:" + case, bad, case)

    # RTN end to end on the random checkpoints. LLaMA: W4 g32 asym, --save and --json onto existing paths with
    # --overwrite. OPT: W3 per-channel symmetric.
    ldir = root / "llama-out"
    (ldir / "ckpt").mkdir(parents=True)
    (ldir / "ckpt" / "stale.txt").write_text("replace me")
    (ldir / "rtn.json").write_text("stale")
    ctx["llama_out"] = ldir
    submit("llama", _cli, env, "--model", ctx["llama"], "--method", "rtn", "--wbits", "4", "--groupsize", "32",
           "--baseline", "--ppl-text", ctx["text"], *FAST,
           "--save", ldir / "ckpt", "--json", ldir / "rtn.json", "--overwrite")
    odir = root / "opt-out"
    odir.mkdir()
    ctx["opt_out"] = odir
    # OPT: progress bars on (stderr is a pipe: one final line per bar), --json into folders that do not exist yet.
    submit("opt", _cli, env, "--model", ctx["opt"], "--method", "rtn", "--wbits", "3", "--groupsize", "-1", "--sym",
           "--kernel", "xla", "--baseline", "--ppl-text", ctx["text"], *[a for a in FAST if a != "--no-progress"],
           "--json", odir / "new" / "dir" / "rtn.json")

  yield futures, ctx
  pool.shutdown(wait=True, cancel_futures=True)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
  assert "Traceback" not in proc.stderr, proc.stderr
  return proc


def _no_temp_leftovers(parent: Path):
  """No temporary ``.NAME.tmp-*`` save folder or ``.NAME.*`` JSON file left next to the outputs."""
  assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]


def _is_checkpoint(d: Path, source: Path):
  assert (d / "params").is_dir()
  meta = json.loads((d / "qjax.json").read_text())
  assert meta["format"] == "qjax-checkpoint-v2" and (d / "layers" / "0").is_dir()
  assert json.loads((d / "config.json").read_text()) == json.loads((source / "config.json").read_text())
  assert any((d / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
  return meta


# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(runs, case):
  """Exit status 2, one line on stderr naming the problem, no traceback, nothing on stdout, nothing written."""
  futures, ctx = runs
  proc = futures["bad:" + case].result()
  t = ctx["root"] / f"bad-{case}"
  err = proc.stderr.strip()
  assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
  assert len(err.splitlines()) == 1, err
  assert "Traceback" not in err and "error:" in err, err
  for word in BAD[case][1]:
    assert word.lower() in err.lower(), (word, err)
  assert proc.stdout.strip() == "", proc.stdout
  # Nothing written (no --save folder, no --json file, no temporary files) and the inputs untouched: for the
  # NaN/Inf cases the poisoned model.safetensors keeps its sha256, for save_exists the existing folder its file.
  assert not (t / "out").exists() and not (t / "out.json").exists()
  assert _hashes(t) == ctx[f"files-before:{case}"]
  if case in ("nan_weights", "inf_weights"):
    assert ctx[f"poisoned:{case}"] in err


def test_rtn_w4g32_with_baseline_and_json(runs):
  futures, ctx = runs
  proc = _ok(futures["stories"].result())
  sdir = ctx["stories_dir"]
  out = json.loads((sdir / "rtn.json").read_text())
  assert {"ppl", "ppl_baseline", "size", "timing", "config", "protocol"} <= set(out)
  assert {"bits_per_weight", "quantized_bytes", "fp16_bytes"} <= set(out["size"])
  assert {"quantize_seconds", "eval_tokens_per_second"} <= set(out["timing"])
  assert list(out["ppl"]) == list(out["ppl_baseline"]) == ["tinystories"]
  q, fp = out["ppl"]["tinystories"], out["ppl_baseline"]["tinystories"]
  assert 1.0 < fp < q < 3 * fp
  size = out["size"]
  assert 4.5 < size["bits_per_weight"] < 5.2
  assert 0 < size["quantized_bytes"] < size["fp16_bytes"]
  assert out["timing"]["quantize_seconds"] >= 0 and out["timing"]["eval_tokens_per_second"] > 0
  assert 0 < out["timing"]["compile_seconds"] <= out["timing"]["quantize_seconds"]  # a fresh process compiles
  assert "(of which compiling" in proc.stdout
  cfg = out["config"]
  assert cfg["seqlen"] == 64 and cfg["eval_nsamples"] == 2
  assert cfg["method"]["name"] == "rtn"
  assert cfg["method"]["config"]["bits"] == 4 and cfg["method"]["config"]["group_size"] == 32
  assert Path(cfg["model_dir"]).resolve() == STORIES.resolve()
  assert "GPTQ" in out["protocol"]
  # The summary tables on stdout.
  for text in ("dataset", "tinystories", "fp ppl", "rtn W4 ppl", "bits / quantized weight",
               f"{size['bits_per_weight']:.3f}", f"{size['quantized_bytes']:,}", "compression vs fp16"):
    assert text in proc.stdout, (text, proc.stdout)
  assert f"{q:.4g}" in proc.stdout and f"{fp:.4g}" in proc.stdout
  _no_temp_leftovers(sdir)


def test_save_then_load_gives_the_same_ppl(runs):
  futures, ctx = runs
  _ok(futures["stories"].result())
  proc = _ok(futures["load"].result())
  sdir = ctx["stories_dir"]
  meta = _is_checkpoint(sdir / "ckpt", STORIES)
  assert meta["method"]["name"] == "rtn" and meta["method"]["config"]["group_size"] == 32
  assert meta["qarrays"] and all(q["bits"] == 4 for q in meta["qarrays"].values())
  saved = json.loads((sdir / "rtn.json").read_text())
  loaded = json.loads((sdir / "load.json").read_text())
  assert loaded["ppl"] == saved["ppl"]  # exactly the same floats
  assert loaded["size"] == saved["size"]
  assert loaded["config"]["method"] == saved["config"]["method"]
  assert "ppl_baseline" not in loaded
  assert "bits / quantized weight" in proc.stdout
  _no_temp_leftovers(sdir)
  assert sorted(p.name for p in sdir.iterdir()) == ["ckpt", "load.json", "rtn.json"]
  assert _hashes(STORIES) == ctx["stories_hashes_before"]  # the source model folder is only read


def _reference_ppl(model_dir: Path) -> float:
  """fp32 torch perplexity of TEXT with the CLI settings (BOS + 1 token per char, seqlen 64, first 2 windows)."""
  from transformers import AutoTokenizer
  ids = np.asarray(AutoTokenizer.from_pretrained(model_dir)(TEXT)["input_ids"])
  assert len(ids) == len(TEXT) + 1
  return torch_perplexity(model_dir, ids, seqlen=64, nsamples=2)


def test_random_llama_end_to_end_with_overwrite(runs):
  futures, ctx = runs
  proc = _ok(futures["llama"].result())
  ldir = ctx["llama_out"]
  out = json.loads((ldir / "rtn.json").read_text())  # --overwrite replaced the stale file
  assert list(out["ppl"]) == ["story.txt"]  # --ppl-text alone: the default named dataset is not added
  assert set(out["timing"]["eval_tokens_per_second_by_dataset"]) == {"story.txt"}
  q, fp = out["ppl"]["story.txt"], out["ppl_baseline"]["story.txt"]
  assert fp == pytest.approx(_reference_ppl(ctx["llama"]), rel=1e-4)
  assert q != fp and 0.8 < q / fp < 1.25
  assert 4.5 < out["size"]["bits_per_weight"] < 5.2
  assert out["config"]["method"]["config"]["group_size"] == 32
  # --overwrite replaced the existing folder by a complete checkpoint.
  meta = _is_checkpoint(ldir / "ckpt", ctx["llama"])
  assert not (ldir / "ckpt" / "stale.txt").exists()
  assert len(meta["qarrays"]) == 2 * 7  # every decoder linear of the 2 layers
  _no_temp_leftovers(ldir)
  assert "story.txt" in proc.stdout
  assert _hashes(ctx["llama"]) == ctx["llama_hashes_before"]


def test_random_opt_end_to_end(runs):
  futures, ctx = runs
  proc = _ok(futures["opt"].result())
  out = json.loads((ctx["opt_out"] / "new" / "dir" / "rtn.json").read_text())  # missing parents were created
  # Progress on a redirected stderr: no carriage-return frames, one final line per bar.
  assert "\r" not in proc.stderr
  assert re.search(r"^ppl story.txt \(quantized\): 1/1 in [0-9.]+ s$", proc.stderr, re.M), proc.stderr
  assert re.search(r"^ppl story.txt \(fp\): 1/1 in", proc.stderr, re.M) and "RTN W3: 12/12 in" in proc.stderr
  q, fp = out["ppl"]["story.txt"], out["ppl_baseline"]["story.txt"]
  assert fp == pytest.approx(_reference_ppl(ctx["opt"]), rel=1e-4)
  assert q != fp and 0.8 < q / fp < 1.25
  assert 3.0 < out["size"]["bits_per_weight"] < 3.5  # 3-bit codes + one fp16 scale per row, no zero points
  assert out["config"]["method"]["config"] == {**out["config"]["method"]["config"],
                                               "bits": 3, "group_size": -1, "sym": True}
  assert "story.txt" in proc.stdout and "rtn W3 ppl" in proc.stdout
  assert out["config"]["matmul_path"] == "emulated (dequantize + matmul)"          # --kernel xla
  assert _hashes(ctx["opt"]) == ctx["opt_hashes_before"]
