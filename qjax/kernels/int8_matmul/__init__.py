"""Integer matmuls (W8A8 ``int8 x int8 -> int32`` and LLM.int8()'s mixed decomposition); ``xla.py`` is the
reference implementation (see its docstring for the math)."""
from qjax.kernels.int8_matmul.xla import llm_int8_matmul, reference, w8a8_matmul

__all__ = ["llm_int8_matmul", "reference", "w8a8_matmul"]
