"""The optional native CPU kernel ``qjax.kernels.qmatmul._cpu_kernel`` (an XLA FFI handler, see
``qjax/kernels/qmatmul/cpu.py``); all other package metadata lives in ``pyproject.toml``.

The extension is ``optional``: without a C++17 compiler (or without jaxlib's FFI headers) installation still
succeeds and ``qmatmul`` runs the XLA reference. No ``-march`` flag: the AVX2 code is chosen per function at run
time.
"""
import importlib.util
import os
import sys

from setuptools import Extension, setup


def _jaxlib_include():
  """jaxlib's bundled headers (``xla/ffi/api/ffi.h``), found without importing jax."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return None
  inc = os.path.join(list(spec.submodule_search_locations)[0], "include")
  return inc if os.path.isfile(os.path.join(inc, "xla", "ffi", "api", "ffi.h")) else None


def _extensions():
  inc = _jaxlib_include()
  if inc is None or sys.platform == "win32":
    return []
  return [Extension("qjax.kernels.qmatmul._cpu_kernel", sources=["qjax/kernels/qmatmul/cpu_kernel.cc"],
                    include_dirs=[inc], language="c++", extra_compile_args=["-O3", "-std=c++17", "-g0"], optional=True)]


setup(ext_modules=_extensions())
