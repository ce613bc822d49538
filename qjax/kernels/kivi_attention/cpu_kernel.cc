// Native CPU kivi_attention: decode attention of a few queries against a KIVI cache read from its packed codes, as
// an XLA FFI handler in a Python extension module (see qjax/kernels/kivi_attention/cpu.py for the contract).
//
// One task per (row b, KV head g) handles the R = t * h / kvh query rows reading that head:
//   keys, per group j of G store tokens:  qs[r] = q[r] * kscale[j],  qm[r] = q[r] . kmn[j]
//                                         score[r, s] = qs[r] . code[s] + qm[r]          (KIVI's per-channel keys)
//   pending tokens:                       score[r, P0 + i] = q[r] . k_pend[i]
//   softmax over the visible tokens (mask_store below length, mask_pend), float32
//   values, per store token s:            acc[r] += (p[r, s] * vscale[s, c / G]) * code[s],
//                                         macc[r, c / G] += p[r, s] * vmn[s, c / G]          (per-token values)
//   out[r] = (acc[r] + macc[r] + sum_i p[r, P0 + i] v_pend[i]) / sum_s p[r, s]
// (q is pre-multiplied by the attention scale.) Codes are unpacked 8 at a time from `bits` bytes of the row's
// little-endian bit stream (widths 1..4 and 8; other widths, and CPUs without AVX2/FMA/F16C, take the portable
// path that extracts each code with shifts). Nothing the size of the store is ever dequantized: one token's codes
// at a time.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__x86_64__) || defined(__i386__)
#define QJAX_X86 1
#include <immintrin.h>
#else
#define QJAX_X86 0
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "../native.h"

namespace ffi = xla::ffi;

namespace qjax_kivi {

using qjax_native::HasAvx2;
using qjax_native::ScaleType;

struct Scales {
  const void* data;
  ScaleType type;
};

struct Problem {
  int64_t b, t, h, kvh, d, L, P, G, rep, pk, pv;
  int kbits, vbits;
  float scale;
  const float* q;
  const uint8_t* kcodes;
  Scales kscale, kmn;
  const uint8_t* vcodes;
  Scales vscale, vmn;
  const float* kpend;
  const float* vpend;
  const bool* mask_store;
  const bool* mask_pend;
  const int32_t* length;
  float* out;
};

// ---------------------------------------------------------------------------------------------------------------
// Primitives: unpack one token's d codes to floats, dot, axpy. Portable versions, and AVX2 ones below.

struct PortableOps {
  static void Unpack(const uint8_t* row, int bits, int64_t d, float* out) {
    const uint32_t mask = (1u << bits) - 1;
    for (int64_t c = 0; c < d; ++c) {
      const int64_t bit = c * bits;
      uint32_t v = row[bit >> 3] >> (bit & 7);
      if ((bit & 7) + bits > 8) v |= static_cast<uint32_t>(row[(bit >> 3) + 1]) << (8 - (bit & 7));
      out[c] = static_cast<float>(v & mask);
    }
  }
  static float Dot(const float* a, const float* b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
    return acc;
  }
  static void Axpy(float a, const float* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
  }
  // n scales or minima from element `start` of x, as float32
  static void Load(const Scales& x, int64_t start, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) {
      switch (x.type) {
        case ScaleType::kF16: out[i] = qjax_native::HalfToFloat(static_cast<const uint16_t*>(x.data)[start + i]); break;
        case ScaleType::kBF16: out[i] = qjax_native::Bf16ToFloat(static_cast<const uint16_t*>(x.data)[start + i]); break;
        default: out[i] = static_cast<const float*>(x.data)[start + i];
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// One (row, KV head) task, once per instruction set (cpu_task.inc).

namespace portable {
using Ops = PortableOps;
#include "cpu_task.inc"
}  // namespace portable

#if QJAX_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define QJAX_INLINE inline __attribute__((always_inline))

struct Avx2Ops {
  template <int B>
  static QJAX_INLINE void UnpackWidth(const uint8_t* row, int64_t d, float* out) {  // 8 codes = B bytes
    const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
    for (int64_t c = 0; c < d; c += 8) {
      uint32_t w = 0;
      std::memcpy(&w, row + c / 8 * B, B);
      const __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), shifts), mask);
      _mm256_storeu_ps(out + c, _mm256_cvtepi32_ps(v));
    }
  }
  // d is a multiple of 8; widths 1..4 and 8 (the others take the portable unpack)
  static QJAX_INLINE void Unpack(const uint8_t* row, int bits, int64_t d, float* out) {
    switch (bits) {
      case 1: return UnpackWidth<1>(row, d, out);
      case 2: return UnpackWidth<2>(row, d, out);
      case 3: return UnpackWidth<3>(row, d, out);
      case 4: return UnpackWidth<4>(row, d, out);
      case 8:
        for (int64_t c = 0; c < d; c += 8) {
          const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c));
          _mm256_storeu_ps(out + c, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)));
        }
        return;
      default: return PortableOps::Unpack(row, bits, d, out);
    }
  }
  static QJAX_INLINE float Dot(const float* a, const float* b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    const __m256 s8 = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float acc = _mm_cvtss_f32(s);
    for (; i < n; ++i) acc += a[i] * b[i];
    return acc;
  }
  static QJAX_INLINE void Axpy(float a, const float* x, float* y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] += a * x[i];
  }
  static void Load(const Scales& x, int64_t start, int64_t n, float* out) {
    if (x.type != ScaleType::kF16) return PortableOps::Load(x, start, n, out);
    const uint16_t* h = static_cast<const uint16_t*>(x.data) + start;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
    for (; i < n; ++i) out[i] = _cvtsh_ss(h[i]);
  }
};

namespace avx2 {
using Ops = Avx2Ops;
#include "cpu_task.inc"
}  // namespace avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // QJAX_X86

// ---------------------------------------------------------------------------------------------------------------
// The FFI handler.

ffi::Error Check(bool ok, const std::string& what) {
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument("qjax cpu kivi_attention: " + what);
}

bool ScaleTypeOf(const ffi::AnyBuffer& x, ScaleType* out) {
  switch (x.element_type()) {
    case ffi::DataType::F16: *out = ScaleType::kF16; return true;
    case ffi::DataType::BF16: *out = ScaleType::kBF16; return true;
    case ffi::DataType::F32: *out = ScaleType::kF32; return true;
    default: return false;
  }
}

ffi::Error KIVIAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::U8> kcodes,
                             ffi::AnyBuffer kscale, ffi::AnyBuffer kmn, ffi::Buffer<ffi::U8> vcodes,
                             ffi::AnyBuffer vscale, ffi::AnyBuffer vmn, ffi::Buffer<ffi::F32> kpend,
                             ffi::Buffer<ffi::F32> vpend, ffi::Buffer<ffi::PRED> mask_store,
                             ffi::Buffer<ffi::PRED> mask_pend, ffi::Buffer<ffi::S32> length,
                             ffi::ResultBuffer<ffi::F32> out, int64_t k_bits, int64_t v_bits, int64_t group_size,
                             float scale, int64_t force_scalar) {
  const auto qd = q.dimensions(), kd = kcodes.dimensions(), vd = vcodes.dimensions(), pd = kpend.dimensions();
  if (auto e = Check(qd.size() == 4 && kd.size() == 4 && vd.size() == 4 && pd.size() == 4, "rank-4 operands expected");
      e.failure()) return e;
  Problem p;
  p.b = qd[0]; p.t = qd[1]; p.h = qd[2]; p.d = qd[3];
  p.kvh = kd[1]; p.L = kd[2]; p.pk = kd[3]; p.pv = vd[3]; p.P = pd[1]; p.G = group_size;
  p.kbits = static_cast<int>(k_bits); p.vbits = static_cast<int>(v_bits); p.scale = scale;
  if (auto e = Check(k_bits >= 1 && k_bits <= 8 && v_bits >= 1 && v_bits <= 8 && p.d % 8 == 0 && p.G > 0 &&
                     p.d % p.G == 0 && p.L % p.G == 0 && p.kvh > 0 && p.h % p.kvh == 0,
                     "bits in 1..8, head_dim a multiple of 8 and of G, L a multiple of G, heads a multiple of kvh");
      e.failure()) return e;
  if (auto e = Check(kd[0] == p.b && p.pk == p.d * k_bits / 8 && vd[0] == p.b && vd[1] == p.kvh && vd[2] == p.L &&
                     p.pv == p.d * v_bits / 8 && pd[0] == p.b && pd[2] == p.kvh && pd[3] == p.d,
                     "codes [b, kvh, L, d * bits / 8] and pending [b, P, kvh, d] expected"); e.failure()) return e;
  auto count = [](const auto& x) { return static_cast<int64_t>(x.element_count()); };
  if (auto e = Check(count(kscale) == p.b * p.kvh * (p.L / p.G) * p.d && count(kmn) == count(kscale) &&
                     count(vscale) == p.b * p.kvh * p.L * (p.d / p.G) && count(vmn) == count(vscale) &&
                     count(mask_store) == p.b * p.t * p.L && count(mask_pend) == p.b * p.t * p.P &&
                     count(length) == p.b && count(vpend) == count(kpend),
                     "scale / mn, masks or length of the wrong size"); e.failure()) return e;
  if (auto e = Check(ScaleTypeOf(kscale, &p.kscale.type) && ScaleTypeOf(kmn, &p.kmn.type) &&
                     ScaleTypeOf(vscale, &p.vscale.type) && ScaleTypeOf(vmn, &p.vmn.type),
                     "scales and minima must be f16, bf16 or f32"); e.failure()) return e;
  p.rep = p.h / p.kvh;
  p.q = q.typed_data();
  p.kcodes = kcodes.typed_data();
  p.kscale.data = kscale.untyped_data(); p.kmn.data = kmn.untyped_data();
  p.vcodes = vcodes.typed_data();
  p.vscale.data = vscale.untyped_data(); p.vmn.data = vmn.untyped_data();
  p.kpend = kpend.typed_data(); p.vpend = vpend.typed_data();
  p.mask_store = mask_store.typed_data(); p.mask_pend = mask_pend.typed_data();
  p.length = length.typed_data();
  p.out = out->typed_data();
  void (*task)(const Problem&, int64_t, int64_t) = &portable::Task;
#if QJAX_X86
  if (!force_scalar && HasAvx2()) task = &avx2::Task;
#endif
  qjax_native::ParallelFor(pool, p.b * p.kvh, [&p, task](int64_t c) { task(p, c / p.kvh, c % p.kvh); });
  return ffi::Error::Success();
}

}  // namespace qjax_kivi

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxKIVIAttentionCpu, qjax_kivi::KIVIAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::U8>>()    // key codes
                                  .Arg<ffi::AnyBuffer>()          // key scale
                                  .Arg<ffi::AnyBuffer>()          // key mn
                                  .Arg<ffi::Buffer<ffi::U8>>()    // value codes
                                  .Arg<ffi::AnyBuffer>()          // value scale
                                  .Arg<ffi::AnyBuffer>()          // value mn
                                  .Arg<ffi::Buffer<ffi::F32>>()   // pending keys
                                  .Arg<ffi::Buffer<ffi::F32>>()   // pending values
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask_store
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask_pend
                                  .Arg<ffi::Buffer<ffi::S32>>()   // length
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k_bits")
                                  .Attr<int64_t>("v_bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("force_scalar"));

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernel",
                              "qjax native CPU kivi_attention (XLA FFI handler)", -1, nullptr, nullptr, nullptr,
                              nullptr, nullptr};

PyMODINIT_FUNC PyInit__cpu_kernel(void) {
  return qjax_native::HandlerModule(&kModule, "kivi_attention", reinterpret_cast<void*>(&QjaxKIVIAttentionCpu));
}
