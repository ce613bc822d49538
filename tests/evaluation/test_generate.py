"""Generation with a KV cache (``qjax.generate``): greedy parity with transformers' ``generate``, left-padded
batches, cached vs uncached logits, sampling, stop tokens, and the ``python -m qjax.generate`` CLI.

Compilation dominates: generators are module fixtures, and the stories260K tests share one cache length
(:data:`MAX_LEN`) so their decode loops compile once per batch size and decoding rule. The CLI subprocesses the
selected tests need start before the first test (:func:`cli_runs`) and run while the in-process tests compile;
the CLI cases that need the tokenizer (whose loading imports torch) run in-process through ``main``.
"""
from __future__ import annotations

import concurrent.futures
import functools
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference
from qjax.io import assets, text as data
from qjax.cli import generate
from qjax.evaluation import generation
from qjax.core.errors import InputError
from qjax.models.kv_cache import KVCache
from qjax.io.hf import load_model

REPO = Path(__file__).resolve().parents[2]
STORIES = assets.asset(assets.DEFAULT_MODEL)
PROMPT = "Once upon a time"
NEW = 64
PROMPTS = [PROMPT, "Lily and her dog went to the big park to play with a ball"]  # a left-padded batch
MAX_LEN = 80  # every stories260K generation below fits (prompts <= 16 tokens)

# Bad CLI input: name -> (arguments, words the one-line error must contain). Subprocesses.
BAD = {
    "no_prompt": ([], ["--prompt", "--chat"]),
    "max_new_tokens_0": (["--prompt", "Hi", "--max-new-tokens", "0"], ["--max-new-tokens", "0"]),
    "temperature_negative": (["--prompt", "Hi", "--temperature", "-0.5"], ["temperature", "-0.5"]),
    "top_p_0": (["--prompt", "Hi", "--top-p", "0"], ["top-p", "(0, 1]"]),
    "top_p_above_1": (["--prompt", "Hi", "--top-p", "1.5"], ["top-p", "1.5"]),
    "model_missing": (["--prompt", "Hi", "--model", "/no/such/model"], ["/no/such/model", "does not exist"]),
    "stop_token_beyond_vocab": (["--prompt", "Hi", "--stop-token", "99999"], ["--stop-token", "99999", "511"]),
    "json_unwritable": (["--prompt", "Hi", "--json", "/sys/qjax-generate.json"], ["--json", "cannot be written"]),
    "kv_bits_without_kv_method": (["--prompt", "Hi", "--kv-bits", "2"], ["--kv-bits", "--kv-method"]),
}
CHAT_LINES = ["Once upon a time", "The little dog ran to the park and saw a big red ball", "Lily"]
# Bad input detected after loading the model and tokenizer: in-process.
BAD_LOADED = {
    "prompt_beyond_context": (["--prompt", "Once upon a time " * 200], ["prompt", "longer", "context", "512"]),
    "prompt_fills_max_len": (["--prompt", PROMPT, "--max-len", "5"], ["5 tokens", "no room", "cache of 5"]),
    "max_len_beyond_context": (["--prompt", PROMPT, "--max-len", "1024"], ["--max-len", "1024", "context"]),
}


def _cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  return subprocess.run([sys.executable, "-m", "qjax.generate", *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, input=stdin)


@pytest.fixture(scope="module", autouse=True)
def cli_runs(request, tmp_path_factory):
  """The CLI subprocesses of the selected tests, started together on two workers: ``(name -> future of the
  finished process, output folder)``."""
  selected = {item.name for item in request.session.items if item.module is sys.modules[__name__]}
  out = tmp_path_factory.mktemp("generate_cli")
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
  runs = {}
  if "test_cli_prints_the_completion" in selected:
    runs["ok"] = pool.submit(_cli, "--prompt", PROMPT, "--max-new-tokens", 8, "--method", "rtn", "--wbits", 4,
                             "--json", out / "out.json")
  if "test_cli_chat_compiles_once_per_bucket" in selected:
    runs["chat"] = pool.submit(_cli, "--chat", "--max-new-tokens", 8, stdin="\n".join(CHAT_LINES) + "\n")
  for k, (a, _) in BAD.items():
    if f"test_cli_bad_input[{k}]" in selected:
      runs[f"bad:{k}"] = pool.submit(_cli, *a)
  yield runs, out
  pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def stories():
  model, params = load_model(STORIES)
  return model, params, data.load_tokenizer(STORIES)


@pytest.fixture(scope="module")
def greedy(stories):
  return generation.Generator(*stories)


@pytest.fixture(scope="module")
def random_llama(llama_dir):
  model, params = load_model(llama_dir)
  return model, params, data.load_tokenizer(llama_dir)


@pytest.fixture(scope="module")
def llama_greedy(random_llama):
  return generation.Generator(*random_llama)


@pytest.fixture(scope="module")
def sampled(random_llama):
  """Sampling on the random LLaMA (2 layers: quicker to compile than stories260K)."""
  return generation.Generator(*random_llama, sampling=generation.Sampling(temperature=1.0, top_p=0.9))


def _hf_greedy(path, prompt_ids, new) -> list[int]:
  """transformers' greedy ``generate`` (stops at the config's EOS): the new tokens."""
  torch.set_num_threads(1)
  model = hf_reference.load_torch_model(path)
  ids = torch.tensor([prompt_ids])
  out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                       pad_token_id=model.config.eos_token_id)
  return out[0, len(prompt_ids):].tolist()


def _documented_sample() -> str:
  """The greedy sample of stories260K.md (``./run ... -t 0.0``), paragraphs joined by newlines."""
  md = (assets.asset("models/stories260K-llama2c") / "stories260K.md").read_text()
  return re.search(r"-t 0\.0\n(Once upon a time.*?)\n```", md, re.S).group(1)


def test_greedy_matches_transformers_on_stories260k(greedy):
  r = greedy.generate([PROMPT], NEW, max_len=MAX_LEN)
  prompt = greedy.encode(PROMPT)
  assert r.tokens[0] == _hf_greedy(STORIES, prompt, NEW)
  assert r.finish_reasons == ["length"] and len(r.tokens[0]) == NEW and r.decode_steps == NEW - 1
  assert r.texts[0].startswith(", there was a little girl named Lily. She loved to play outside in the park.")
  assert _documented_sample().startswith(PROMPT + r.texts[0])
  assert r.prompt_lengths == [len(prompt)] and r.max_len == MAX_LEN
  assert r.prefill_seconds > 0 and r.decode_tokens_per_second > 0 and r.compile_seconds > 0
  # stories260K: 5 layers x (K + V) x 4 KV heads x head_dim 8 x 4 bytes
  assert r.cache_bytes_per_token == 5 * 2 * 4 * 8 * 4


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_greedy_matches_transformers_on_random_checkpoints(family, llama_greedy, llama_dir, opt_dir):
  if family == "llama":
    path, gen = llama_dir, llama_greedy
  else:
    model, params = load_model(opt_dir)
    path, gen = opt_dir, generation.Generator(model, params, data.load_tokenizer(opt_dir))
  r = gen.generate([PROMPT], 40)
  ref = _hf_greedy(path, gen.encode(PROMPT), 40)
  assert r.tokens[0] == ref
  assert r.finish_reasons[0] == ("stop" if ref[-1] == hf_reference.EOS_ID else "length")


def test_left_padded_batch_equals_each_prompt_alone(greedy):
  batch = greedy.generate(PROMPTS, 24, max_len=MAX_LEN)
  assert len(set(batch.prompt_lengths)) == 2
  for i, p in enumerate(PROMPTS):
    alone = greedy.generate([p], 24, max_len=MAX_LEN)
    assert batch.tokens[i] == alone.tokens[0] and batch.texts[i] == alone.texts[0]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_cached_decode_logits_equal_full_forward(family, llama_dir, opt_dir):
  """Prefill of a left-padded batch, then teacher-forced decode steps: every step's logits equal the uncached
  forward pass of the whole padded sequence at that position."""
  model, params = load_model({"llama": llama_dir, "opt": opt_dir}[family])
  rng = np.random.default_rng(0)
  ids = rng.integers(4, model.config.vocab_size, size=(2, 14)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :5] = 0  # row 1: 5 padding slots on the left
  full, _ = jax.jit(model.apply)(params, ids, mask)
  prefill = jax.jit(functools.partial(generation.prefill, model))
  step = jax.jit(functools.partial(generation.decode_step, model))
  logits, cache = prefill(params, ids[:, :8], mask[:, :8], KVCache.dense(model.config, 2, 16))
  got = [logits]
  for t in range(8, 14):
    logits, cache = step(params, ids[:, t], cache)
    got.append(logits)
  np.testing.assert_allclose(np.stack(got, 1), np.asarray(full)[:, 7:], rtol=1e-5, atol=1e-5)
  assert int(cache.length) == 14


def test_sampling_is_seeded_and_both_loops_agree(sampled):
  a = sampled.generate([PROMPT], 24, max_len=MAX_LEN, seed=3)
  assert a.tokens == sampled.generate([PROMPT], 24, max_len=MAX_LEN, seed=3).tokens
  assert a.tokens != sampled.generate([PROMPT], 24, max_len=MAX_LEN, seed=4).tokens
  seen = []
  hosted = sampled.generate([PROMPT], 24, max_len=MAX_LEN, seed=3, callback=lambda j, t, on: seen.append(int(t[0])))
  assert hosted.tokens == a.tokens and seen == a.tokens[0]


def test_sample_top_k_top_p_and_top_k_1_is_greedy():
  draw = jax.jit(generation.sample, static_argnums=2)
  key = jax.random.key(0)
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 2000))
  nucleus = np.asarray(draw(logits, key, generation.Sampling(1.0, top_p=0.75)))  # {0, 1}: 0.8 >= 0.75
  assert set(nucleus.tolist()) == {0, 1}
  assert abs((nucleus == 0).mean() - 0.5 / 0.8) < 0.05
  top3 = np.asarray(draw(logits, key, generation.Sampling(1.0, top_k=3)))
  assert set(top3.tolist()) == {0, 1, 2}
  wide = np.random.default_rng(1).normal(size=(256, 512)).astype(np.float32)
  top1 = draw(wide, key, generation.Sampling(0.7, top_k=1, top_p=0.9))
  np.testing.assert_array_equal(top1, draw(wide, key, generation.Sampling()))
  assert len(set(np.asarray(top1).tolist())) > 100  # not a constant


def test_stop_tokens_end_rows(greedy, sampled):
  ref = greedy.generate([PROMPT], 24, max_len=MAX_LEN).tokens[0]
  stop = ref[6]
  cut = ref[:ref.index(stop) + 1]
  r = greedy.generate(PROMPTS, 24, max_len=MAX_LEN, stop_tokens=[stop])
  assert r.tokens[0] == cut and r.finish_reasons[0] == "stop"
  assert r.texts[0] == greedy.tokenizer.decode(greedy.encode(PROMPT) + cut[:-1], skip_special_tokens=True)[
      len(PROMPT):]
  assert greedy.generate([PROMPT], 24, max_len=MAX_LEN, stop_tokens=()).tokens[0] == ref  # never stop
  # Host loop: the row ends at its stop token; the callback saw it, then nothing more.
  long = sampled.generate([PROMPT], 24, max_len=MAX_LEN, seed=3, stop_tokens=()).tokens[0]
  seen = []
  r = sampled.generate([PROMPT], 24, max_len=MAX_LEN, seed=3, stop_tokens=[long[4]],
                       callback=lambda j, t, on: seen.append(int(t[0])))
  assert r.tokens[0] == long[:long.index(long[4]) + 1] == seen
  assert generation.eos_token_ids(greedy.model.config, greedy.tokenizer) == (2,)


def test_stop_strings_end_rows_as_soon_as_their_text_holds_one(greedy):
  """Each row stops at the token that completes a stop string (the tokens are a prefix of the unstopped run and
  its text is cut before the string); a row without the string runs to the length limit."""
  full = greedy.generate(PROMPTS, 24, max_len=MAX_LEN, stop_tokens=())
  text = full.texts[0]
  stop = text[len(text) // 3:len(text) // 3 + 3]          # a string row 0 holds by a third of its text
  r = greedy.generate(PROMPTS, 24, max_len=MAX_LEN, stop_tokens=(), stop_strings=[stop, "never-seen"])
  for i, (row, f) in enumerate(zip(r.tokens, full.tokens)):
    assert row == f[:len(row)]
    if stop in full.texts[i]:
      assert r.finish_reasons[i] == "stop" and r.texts[i] == full.texts[i][:full.texts[i].index(stop)]
      assert stop not in greedy.tokenizer.decode(row[:-1])  # it ended at the first token that completed it
    else:
      assert r.finish_reasons[i] == "length" and row == f
  assert r.finish_reasons[0] == "stop" and len(r.tokens[0]) < len(full.tokens[0])
  with pytest.raises(ValueError, match="tokenizer"):
    generation.Generator(greedy.model, greedy.params).generate([[1, 2]], 4, stop_strings=["x"])


def test_lengths_are_planned_and_checked():
  assert generation.plan_lengths(10, 128, 512) == (138, 128)
  assert generation.plan_lengths(500, 128, 512) == (512, 12)  # capped at the context
  assert generation.plan_lengths(10, 128, 512, max_len=20) == (20, 10)
  for args, words in [((600, 8, 512), "longer than the model context"), ((20, 8, 512, 20), "no room"),
                      ((10, 0, 512), "max_new_tokens"), ((10, 8, 512, 1024), "exceeds the model context")]:
    with pytest.raises(InputError, match=words):
      generation.plan_lengths(*args)


def test_cli_prints_the_completion(cli_runs):
  runs, out = cli_runs
  proc = runs["ok"].result()
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  res = json.loads((out / "out.json").read_text())
  assert proc.stdout == res["texts"][0] + "\n" and len(res["tokens"][0]) == 8
  assert proc.stdout.startswith(", there was")  # RTN W4 keeps the opening of the greedy story
  assert res["cache"]["bytes_per_token"] == 1280 and res["timing"]["decode_tokens_per_second"] > 0
  assert res["config"]["method"]["name"] == "rtn"
  assert "tokens/s" in proc.stderr and "bytes/token" in proc.stderr


def test_cli_chat_plain_prompt(monkeypatch, capsys, llama_dir, llama_greedy):
  """Without a chat template every stdin line is a prompt of its own (streamed, then a newline); blank lines are
  skipped and "exit" ends the session. Same cache length as the greedy run it is compared with."""
  monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPT}\n\n{PROMPT}\nexit\nnever read\n"))
  n = len(llama_greedy.encode(PROMPT)) + 40
  assert generate.main(["--chat", "--model", str(llama_dir), "--max-new-tokens", "40", "--max-len", str(n)]) == 0
  out, err = capsys.readouterr()
  assert out == 2 * (llama_greedy.generate([PROMPT], 40, max_len=n).texts[0] + "\n")
  lines = err.strip().splitlines()       # the kernel paths, then one report per prompt
  assert len(lines) == 3 and lines[0].startswith("kernels: linears dense; head dense; attention ") and \
      all("tokens/s" in line for line in lines[1:])


def test_cli_chat_compiles_once_per_bucket(cli_runs, greedy):
  """--chat sizes the cache and pads the prompt to power-of-two buckets (here 64 prompt slots, a 128-slot cache,
  not the 512 of the context): turns of different lengths reuse the first turn's compiled functions, and the
  padding changes no token."""
  runs, _ = cli_runs
  proc = runs["chat"].result()
  assert proc.returncode == 0, proc.stderr
  reports = [l for l in proc.stderr.splitlines() if "tokens/s" in l]
  assert len(reports) == 3 and all("128 slots" in r for r in reports), reports
  assert all(r.endswith("compile 0.0 s") for r in reports[1:]), reports
  assert proc.stdout.splitlines() == [greedy.generate([line], 8).texts[0] for line in CHAT_LINES]


@pytest.mark.parametrize("case", list(BAD_LOADED))
def test_cli_bad_input_after_loading(capsys, case):
  assert generate.main(BAD_LOADED[case][0]) == 2
  out, err = capsys.readouterr()
  assert out == "" and len(err.strip().splitlines()) == 1 and "error:" in err
  for word in BAD_LOADED[case][1]:
    assert word in err, (word, err)


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input(cli_runs, case):
  runs, _ = cli_runs
  proc = runs[f"bad:{case}"].result()
  err = proc.stderr.strip()
  assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
  assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
  for word in BAD[case][1]:
    assert word in err, (word, err)
  assert proc.stdout == ""
