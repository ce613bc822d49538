// Shared by qjax's native CPU kernels (XLA FFI handlers in Python extension modules): half-precision loads, the
// run-time AVX2 check, a parallel-for over the FFI intra-op thread pool, and the extension module of a handler.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace qjax_native {

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400u));
    bits = sign | ((112 - e) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

enum class ScaleType { kF16, kBF16, kF32 };

#if defined(__x86_64__) || defined(__i386__)
// AVX2 + FMA + F16C, checked once at run time (code for it is compiled with per-function target attributes, never
// with -march: users' CPUs differ).
inline bool HasAvx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
}
#else
inline inline bool HasAvx2() { return false; }
#endif

// Chunks claimed dynamically by the caller and pool tasks. A task that starts after every chunk is claimed does
// nothing, so the caller never waits on a task that has not started (no deadlock when the caller itself is a pool
// thread); the shared state is reference counted for such late tasks.
struct Chunks {
  int64_t count = 0;
  std::function<void(int64_t)> work;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Run() {
    for (int64_t c; (c = next.fetch_add(1)) < count;) {
      work(c);
      if (done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

// work(c) for c in [0, count), on the calling thread and up to threads - 1 pool tasks (the pool has about one
// thread per core and the caller is one more worker); everything on the caller when the pool is empty or count <= 1.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> work) {
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 0);
  if (threads == 0 || count <= 1) {
    for (int64_t c = 0; c < count; ++c) work(c);
    return;
  }
  auto chunks = std::make_shared<Chunks>();
  chunks->count = count;
  chunks->work = std::move(work);
  const int64_t helpers = std::min(std::max<int64_t>(threads - 1, 1), count - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([chunks] { chunks->Run(); });
  chunks->Run();
  std::unique_lock<std::mutex> lock(chunks->mu);
  chunks->cv.wait(lock, [&] { return chunks->done.load() == chunks->count; });
}

// The extension module of one FFI handler: `def`'s module with the handler as the PyCapsule attribute `name` and
// the constant HAS_AVX2; nullptr (a Python error set) on failure. Python.h must be included before this header.
inline PyObject* HandlerModule(PyModuleDef* def, const char* name, void* handler) {
  PyObject* m = PyModule_Create(def);
  if (m == nullptr) return nullptr;
  PyObject* cap = PyCapsule_New(handler, nullptr, nullptr);
  if (cap == nullptr || PyModule_AddObject(m, name, cap) < 0) {
    Py_XDECREF(cap);
    Py_DECREF(m);
    return nullptr;
  }
  if (PyModule_AddIntConstant(m, "HAS_AVX2", HasAvx2() ? 1 : 0) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

}  // namespace qjax_native
