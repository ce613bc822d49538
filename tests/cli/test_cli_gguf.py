"""``python -m qjax.quantize`` with GGUF files: ``--model FILE.gguf`` in, ``--export-gguf`` out (and a qjax
checkpoint saved from a GGUF source), and the bad inputs: one line on stderr, exit status 2, nothing written."""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from qjax import api
from qjax.evaluation import perplexity
from qjax.io import assets, gguf_export, gguf_load
from qjax.io import text as data
from qjax.io.hf import load_model
from qjax.methods import RTNConfig

REPO = Path(__file__).resolve().parents[2]
FAST = ["--seqlen", "64", "--eval-nsamples", "4", "--no-progress"]


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
  return subprocess.run([sys.executable, "-m", "qjax.quantize", *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stories_dir, opt_dir, llama_dir):
  t = tmp_path_factory.mktemp("gguf-cli")
  model, params = load_model(stories_dir)
  gguf_export.export_gguf(t / "fp.gguf", params, model, source=stories_dir, dense_type="F32")
  w = gguf.GGUFWriter(t / "gpt2.gguf", "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  good = (t / "fp.gguf").read_bytes()
  (t / "cut.gguf").write_bytes(good[: len(good) // 3])
  (t / "taken.gguf").write_bytes(b"keep me")
  cases = {
      "quantize": ["--model", t / "fp.gguf", "--method", "rtn", "--wbits", "4", "--groupsize", "32", "--sym",
                   "--export-gguf", t / "out" / "q.gguf", "--gguf-dense-type", "F32", "--save", t / "ck", "--json", t / "q.json", *FAST],
      "arch": ["--model", t / "gpt2.gguf", *FAST],
      "cut": ["--model", t / "cut.gguf", *FAST],
      "exists": ["--model", t / "fp.gguf", "--method", "rtn", "--export-gguf", t / "taken.gguf", *FAST],
      "dense_type_alone": ["--model", t / "fp.gguf", "--gguf-dense-type", "F32", *FAST],
      "opt": ["--model", opt_dir, "--method", "rtn", "--export-gguf", t / "opt.gguf", *FAST],
      "llama3_rope": ["--model", llama_dir, "--method", "rtn", "--export-gguf", t / "l3.gguf", *FAST],
  }
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {k: pool.submit(_cli, *v) for k, v in cases.items()}
    return t, {k: f.result() for k, f in futures.items()}


def test_quantize_a_gguf_export_gguf_and_save(runs):
  t, r = runs
  proc = r["quantize"]
  assert proc.returncode == 0, proc.stderr
  out = json.loads((t / "q.json").read_text())
  exp = out["export_gguf"]
  assert exp["types"]["blk.0.attn_q.weight"] == "Q4_0" and "blk.0.ffn_down.weight" in exp["dense"]
  assert "GGUF export:" in proc.stdout and "Q4_0" in proc.stdout
  # in-process, the same recipe on the GGUF-loaded model: the CLI's perplexity, and the exported file's logits
  model, params = gguf_load.load_model(t / "fp.gguf")
  q = api.quantize_model(model, params, api.Recipe(weights=(api.Rule(model.family.linear_pattern,
                                                                     RTNConfig(bits=4, group_size=32, sym=True)),)))
  tokens = data.tokenize(data.load_tokenizer(gguf_load.hf_view(t / "fp.gguf")),
                         data.read_text(assets.named_text("tinystories", assets.PPL_DATASETS)))
  ref = perplexity.perplexity(q.model, q.params, tokens, 64, 4, progress=False).ppl
  assert out["ppl"]["tinystories"] == pytest.approx(ref, rel=1e-6)
  m2, p2 = gguf_load.load_model(t / "out" / "q.gguf")
  ids = np.arange(1, 65, dtype=np.int32)[None]
  np.testing.assert_allclose(np.asarray(m2.apply(p2, ids)[0]), np.asarray(q.model.apply(q.params, ids)[0]),
                             rtol=1e-5, atol=1e-5)  # Q4_0 holds qjax's codes; the rest written F32
  # the qjax checkpoint saved from a GGUF source holds its config and tokenizer, and reloads
  assert (t / "ck" / "config.json").is_file() and (t / "ck" / "tokenizer.json").is_file()
  again = _cli("--load", t / "ck", "--json", t / "l.json", *FAST)
  assert again.returncode == 0, again.stderr
  assert json.loads((t / "l.json").read_text())["ppl"] == out["ppl"]


@pytest.mark.parametrize("case,words", [("arch", ["architecture 'gpt2'", "supported: llama"]),
                                        ("cut", ["damaged or truncated GGUF"]),
                                        ("exists", ["already exists", "--overwrite"]),
                                        ("dense_type_alone", ["--gguf-dense-type", "--export-gguf"]),
                                        ("opt", ["supports llama models, not opt"]),
                                        ("llama3_rope", ["RoPE scaling 'llama3'"])])
def test_bad_input(runs, case, words):
  t, r = runs
  proc = r[case]
  err = proc.stderr.strip()
  assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
  for w in words:
    assert w in err, (w, err)
  assert (t / "taken.gguf").read_bytes() == b"keep me"
  assert not (t / "opt.gguf").exists() and not (t / "l3.gguf").exists()
