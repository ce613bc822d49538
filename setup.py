"""The optional native CPU kernels ``qjax.kernels.<op>._cpu_kernel`` (XLA FFI handlers, see ``qjax/kernels/qmatmul/cpu.py``
and ``qjax/kernels/kivi_attention/cpu.py``); all other package metadata lives in ``pyproject.toml``.

The extension is ``optional``: without a C++17 compiler (or without jaxlib's FFI headers) installation still
succeeds and the ops run their XLA references. No ``-march`` flag: the AVX2 code is chosen per function at run
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
  return [Extension(f"qjax.kernels.{op}._cpu_kernel", sources=[f"qjax/kernels/{op}/cpu_kernel.cc"],
                    depends=["qjax/kernels/native.h"], include_dirs=[inc], language="c++",
                    extra_compile_args=["-O3", "-std=c++17", "-g0"], optional=True)
          for op in ("qmatmul", "kivi_attention", "lut_gemm")]


setup(ext_modules=_extensions())
