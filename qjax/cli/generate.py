"""``python -m qjax.generate``: complete prompts or chat with a (quantized) model, streaming to the terminal.

The quantization flags are those of ``qjax.quantize`` (:mod:`qjax.cli.recipe`); generation itself is
:mod:`qjax.evaluation.generation`. Example::

    python -m qjax.generate --prompt "Once upon a time" --max-new-tokens 64 --method rtn --wbits 4
"""
from __future__ import annotations

import sys

import numpy as np

from qjax import api
from qjax.cli import common as cli
from qjax.cli import recipe
from qjax.core.errors import InputError
from qjax.evaluation.generation import (GenerationResult, Generator, Sampling, bucket, completion_text, eos_token_ids,
                                        plan_lengths)
from qjax.evaluation.kernel_paths import kernel_paths
from qjax.io import checkpoint
from qjax.io import text as data

PROG = "python -m qjax.generate"


def build_parser() -> cli.Parser:
  p = cli.Parser(prog=PROG, description=__doc__.splitlines()[0])
  cli.add_model_args(p)
  recipe.add_args(p)
  g = p.add_argument_group("generation")
  src = g.add_mutually_exclusive_group()
  src.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
  src.add_argument("--chat", action="store_true",
                   help="interactive: one turn per stdin line until EOF or 'exit' (chat template if any)")
  g.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
  g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
  g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
  g.add_argument("--stop-token", type=int, action="append", default=[], metavar="ID",
                 help="extra stop token id (repeatable; EOS always stops)")
  g.add_argument("--max-len", type=int,
                 help="KV cache slots (default: prompt + new tokens capped at the model context; --chat: the "
                      "power of two that fits the conversation and the new tokens)")
  g.add_argument("--json", help="write tokens, texts, timings and cache size as JSON to this file")
  g.add_argument("--overwrite", action="store_true", help="allow --json to replace an existing file")
  return p


def _validate(args, given) -> Sampling:
  """Checks that need no weights; returns the decoding rule."""
  model_config = cli.model_config(args)
  recipe.validate(args, given, model_config)
  vocab = model_config.vocab_size if model_config is not None else None
  bad = [t for t in args.stop_token if t < 0 or (vocab is not None and t >= vocab)]
  if bad:
    raise InputError(f"--stop-token {bad[0]} is not a token id of this model (vocabulary 0..{vocab - 1})"
                     if vocab else f"--stop-token {bad[0]} is negative")
  if not args.prompt and not args.chat:
    raise InputError("nothing to do: give --prompt TEXT (repeatable) or --chat")
  if any(not p for p in args.prompt):
    raise InputError("--prompt must not be empty")
  if args.max_new_tokens < 1:
    raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
  if args.max_len is not None and args.max_len < 2:
    raise InputError(f"--max-len must be at least 2, got {args.max_len}")
  if args.chat and args.json:
    raise InputError("--json records --prompt runs; it is not available with --chat")
  if args.json:
    checkpoint.check_destination(args.json, args.overwrite, "--json file")
  return Sampling(args.temperature, args.top_k, args.top_p)


class _Streamer:
  """Prints row 0's completion to stdout as its tokens arrive (text held back while it ends in an incomplete
  character); the stop token is not printed."""

  def __init__(self, tokenizer, prompt, stop):
    self.tokenizer, self.prompt, self.stop = tokenizer, prompt, set(stop)
    self.new, self.printed = [], 0

  def __call__(self, j, tokens, active):
    if not active[0] or int(tokens[0]) in self.stop:
      return
    self.new.append(int(tokens[0]))
    text = completion_text(self.tokenizer, self.prompt, self.new)
    if not text.endswith("\ufffd"):
      sys.stdout.write(text[self.printed:])
      sys.stdout.flush()
      self.printed = len(text)

  def finish(self, text: str):
    """Prints what is left of the final ``text`` and a newline."""
    print(text[self.printed:], flush=True)


def _report(r: GenerationResult, cache_dtype, cache_label: str = "dense") -> str:
  tps = r.decode_tokens_per_second
  decode = "no decode step"
  if tps:
    decode = f"{tps:,.1f} tokens/s ({r.decode_steps} steps x {len(r.tokens)} rows in {r.decode_seconds:.3f} s)"
  return (f"prefill {len(r.tokens)} x {max(r.prompt_lengths)} tokens: {r.prefill_seconds:.3f} s; decode: {decode}; "
          f"KV cache {cache_label}, {np.dtype(cache_dtype).name}, {r.max_len} slots: "
          f"{r.cache_bytes_per_token:,.0f} bytes/token; "
          f"compile {r.compile_seconds:.1f} s")


def _paths_line(paths: dict) -> str:
  return "kernels: " + "; ".join(f"{k} {v}" for k, v in paths.items())


def _result_json(r: GenerationResult, args, method, cache_dtype, paths: dict) -> dict:
  return {
      "tokens": r.tokens, "texts": r.texts, "finish_reasons": r.finish_reasons, "prompt_tokens": r.prompt_lengths,
      "timing": {"prefill_seconds": r.prefill_seconds, "decode_seconds": r.decode_seconds,
                 "decode_steps": r.decode_steps, "decode_tokens_per_second": r.decode_tokens_per_second,
                 "compile_seconds": r.compile_seconds},
      "cache": {"dtype": np.dtype(cache_dtype).name, "max_len": r.max_len, "bytes_per_token": r.cache_bytes_per_token},
      "config": {**vars(args), "model_dir": str(cli.model_dir(args)), "method": method},
      "kernels": paths,
  }


def _chat(gen: Generator, args, stop, cache_label: str, pad_prompts: bool):
  """One generation per stdin line; with a chat template the conversation is re-encoded every turn."""
  tok = gen.tokenizer
  template = getattr(tok, "chat_template", None)
  context = gen.model.config.max_position_embeddings
  messages, turn = [], 0
  while True:
    if sys.stdin.isatty():
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line or line.strip() == "exit":
      break
    line = line.strip()
    if not line:
      continue
    if template:
      messages.append({"role": "user", "content": line})
      text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
      ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
      ids = tok(line)["input_ids"]
    # The conversation and the cache grow through a few power-of-two buckets: one compile per bucket, not per turn.
    # Prompts are left-padded to their bucket only with the dense cache (a quantized cache would quantize the
    # padding slots together with real tokens).
    pad_to = bucket(len(ids), context) if pad_prompts else len(ids)
    max_len = args.max_len or bucket(pad_to + args.max_new_tokens, context)
    if pad_to >= max_len:
      pad_to = len(ids)
    stream = _Streamer(tok, ids, stop)
    r = gen.generate([ids], args.max_new_tokens, max_len=max_len, stop_tokens=stop, seed=args.seed + turn,
                     callback=stream, pad_to=pad_to)
    stream.finish(r.texts[0])
    turn += 1
    if template:
      messages.append({"role": "assistant", "content": r.texts[0]})
    print(_report(r, gen.cache_dtype, cache_label), file=sys.stderr, flush=True)


def run(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  given = cli.given_flags(parser, argv, args)
  sampling = _validate(args, given)
  model, params, meta = cli.load_model(args)
  tok = data.load_tokenizer(cli.model_dir(args))
  context = model.config.max_position_embeddings
  if args.max_len is not None and args.max_len > context:
    raise InputError(f"--max-len {args.max_len} exceeds the model context ({context} tokens)")
  prompts = [tok(p)["input_ids"] for p in args.prompt]
  if prompts:  # fail before any long work
    plan_lengths(max(len(p) for p in prompts), args.max_new_tokens, context, args.max_len)
  saved_kv = checkpoint.load_kv_calibration(args.load) if args.load else None
  q = recipe.apply(args, given, model, params, meta, tok, progress=sys.stderr.isatty(), kv_calibration=saved_kv)
  method = q.method
  if args.save_recipe:
    with checkpoint.atomic_file(args.save_recipe) as f:
      f.write(api.dump_recipe(q.recipe, args.save_recipe))
  cache_label = q.kv.describe() if q.kv else "dense"
  gen = Generator(q.model, q.params, tok, sampling=sampling,
                  **({"cache_factory": q.kv.cache_factory} if q.kv else {}))
  stop = sorted(set(eos_token_ids(model.config, tok)) | set(args.stop_token))
  paths = kernel_paths(q.model, q.params, q.act.hooks().linear_input, q.kv.cache_factory if q.kv else None)
  if args.chat:
    print(_paths_line(paths), file=sys.stderr)
    _chat(gen, args, stop, cache_label, pad_prompts=q.kv is None)
    return 0
  stream = _Streamer(tok, prompts[0], stop) if len(prompts) == 1 else None
  r = gen.generate(prompts, args.max_new_tokens, max_len=args.max_len, stop_tokens=stop, seed=args.seed,
                   callback=stream)
  if stream is None:
    print("\n\n".join(r.texts))
  else:
    stream.finish(r.texts[0])
  print(_report(r, gen.cache_dtype, cache_label), file=sys.stderr)
  print(_paths_line(paths), file=sys.stderr)
  if args.json:
    cli.write_json(args.json, _result_json(r, args, method, gen.cache_dtype, paths))
  return 0


def main(argv=None) -> int:
  return cli.run_guarded(run, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
