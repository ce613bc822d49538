"""Shared fixtures: tiny random HF checkpoints (written by transformers) and the real stories260K."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "QJAX_CACHE" not in os.environ:  # GGUF views (converted tokenizers) of this run, not the user's cache
  import atexit
  import shutil
  import tempfile
  os.environ["QJAX_CACHE"] = tempfile.mkdtemp(prefix="qjax-test-cache-")
  atexit.register(shutil.rmtree, os.environ["QJAX_CACHE"], True)

import pytest

import hf_reference
from qjax.io import assets


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
  """GQA, untied embeddings, llama3 rope scaling."""
  return hf_reference.make_llama_checkpoint(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory):
  """Pre-LN OPT with project_in/project_out (word_embed_proj_dim != hidden_size)."""
  return hf_reference.make_opt_checkpoint(tmp_path_factory.mktemp("opt"))


@pytest.fixture(scope="session")
def stories_dir():
  path = assets.asset(assets.DEFAULT_MODEL)
  if not (path / "config.json").is_file():
    pytest.fail(f"stories260K not found at {path}: set QJAX_ASSETS")
  return path
