// Native CPU LUT-GEMM for BCQ weights (decode, small M), as an XLA FFI handler in a Python extension module.
//
//   y[m, n] = sum_g ( sum_i alpha[n, g, i] * sum_{c in g} T_m[c][byte_i(n, c)]  +  offset[n, g] * S_m[g] )
//
// T_m[c][p] = sum_{j < 8} (bit j of p ? +x[m, 8c + j] : -x[m, 8c + j]) is the table of the 256 signed sums of
// the 8 activations of chunk c (columns past K count as 0), byte_i(n, c) the c-th byte of row n of bit plane i
// (its 8 binaries, bit j = +1 for column 8c + j), S_m[g] the sum of x[m] over group g. This equals x @ W^T for
// W[n, k] = sum_i alpha[n, k / gs, i] * b_i[n, k] + offset[n, k / gs] in real arithmetic.
//
// Operands: x f32 [M, K]; planes u32 [q, N, ceil(K / 32)] (bit k % 32 of word k / 32 of a row: binary k is +1);
// alpha [N, G, q] and offset [N, G] f16, bf16 or f32 (offset read only when has_offset); result y f32 [M, N].
// Attributes: group_size (-1: per channel, else a multiple of 8), k, has_offset.
//
// Each table is built from a 3-bit half and a 5-bit half (T[8a + b] = H[a] + L[b]: 32 vectorizable rows of 8
// adds). Output rows are split over the FFI intra-op thread pool and the calling thread; per row, bit plane and
// group the lookups accumulate in four independent chains. Plain C++ (the compiler vectorizes the table build);
// the lookups are scalar loads by nature.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "../native.h"

namespace ffi = xla::ffi;

namespace qjax_lut {

using qjax_native::Bf16ToFloat;
using qjax_native::HalfToFloat;
using qjax_native::ScaleType;

constexpr int64_t kTable = 256;
constexpr int64_t kRowsPerChunk = 32;       // output rows per parallel work item
constexpr int64_t kSerialLookups = 1 << 16; // below this many lookups the calling thread does everything

float Load(const void* p, ScaleType t, int64_t i) {
  switch (t) {
    case ScaleType::kF16: return HalfToFloat(static_cast<const uint16_t*>(p)[i]);
    case ScaleType::kBF16: return Bf16ToFloat(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

struct Problem {
  int64_t M, K, N, q, W, C, G, gs;
  const float* x;
  const uint32_t* planes;
  const void* alpha;
  const void* offset;  // nullptr: no offset
  ScaleType type;
  float* y;
};

// tables [M][C][256] and group sums [M][G] of x.
void BuildTables(const Problem& p, std::vector<float>& tables, std::vector<float>& sums) {
  tables.assign(p.M * p.C * kTable, 0.0f);
  sums.assign(p.M * p.G, 0.0f);
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.x + m * p.K;
    for (int64_t c = 0; c < p.C; ++c) {
      float v[8];
      for (int j = 0; j < 8; ++j) v[j] = 8 * c + j < p.K ? x[8 * c + j] : 0.0f;
      float lo[8], hi[32];
      for (int b = 0; b < 8; ++b) lo[b] = (b & 1 ? v[0] : -v[0]) + (b & 2 ? v[1] : -v[1]) + (b & 4 ? v[2] : -v[2]);
      for (int a = 0; a < 32; ++a) {
        float s = 0.0f;
        for (int j = 0; j < 5; ++j) s += (a >> j) & 1 ? v[3 + j] : -v[3 + j];
        hi[a] = s;
      }
      float* t = tables.data() + (m * p.C + c) * kTable;
      for (int a = 0; a < 32; ++a)
        for (int b = 0; b < 8; ++b) t[8 * a + b] = hi[a] + lo[b];
    }
    for (int64_t k = 0; k < p.K; ++k) sums[m * p.G + k / p.gs] += x[k];
  }
}

// Output rows [n0, n1): per row and bit plane one pass over the plane's bytes, the lookups of each group summed in
// four independent chains and scaled by the group's alpha. (Blocking the columns so that a block's tables stay in
// L1 across rows measured 3x slower: the per-row overhead of short blocks outweighs the L2 hits it saves.)
void Rows(const Problem& p, const float* tables, const float* sums, int64_t n0, int64_t n1) {
  const int64_t gc = p.gs / 8;  // chunks per group (per channel: all of them)
  std::vector<float> acc(p.M);
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i = 0; i < p.q; ++i) {
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(p.planes + (i * p.N + n) * p.W);
      for (int64_t m = 0; m < p.M; ++m) {
        const float* t = tables + m * p.C * kTable;
        float total = 0.0f;
        for (int64_t g = 0; g < p.G; ++g) {
          const int64_t c0 = g * gc, c1 = std::min(p.C, c0 + gc);
          float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
          int64_t c = c0;
          for (; c + 4 <= c1; c += 4) {
            s0 += t[c * kTable + bytes[c]];
            s1 += t[(c + 1) * kTable + bytes[c + 1]];
            s2 += t[(c + 2) * kTable + bytes[c + 2]];
            s3 += t[(c + 3) * kTable + bytes[c + 3]];
          }
          for (; c < c1; ++c) s0 += t[c * kTable + bytes[c]];
          total += Load(p.alpha, p.type, (n * p.G + g) * p.q + i) * ((s0 + s1) + (s2 + s3));
        }
        acc[m] += total;
      }
    }
    if (p.offset != nullptr) {
      for (int64_t g = 0; g < p.G; ++g) {
        const float z = Load(p.offset, p.type, n * p.G + g);
        for (int64_t m = 0; m < p.M; ++m) acc[m] += z * sums[m * p.G + g];
      }
    }
    for (int64_t m = 0; m < p.M; ++m) p.y[m * p.N + n] = acc[m];
  }
}

ffi::Error Check(bool ok, const std::string& what) {
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument("qjax cpu lut_gemm: " + what);
}

ffi::Error LutGemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> planes,
                       ffi::AnyBuffer alpha, ffi::AnyBuffer offset, ffi::ResultBuffer<ffi::F32> y,
                       int64_t group_size, int64_t k, int64_t has_offset) {
  const auto xd = x.dimensions(), pd = planes.dimensions(), ad = alpha.dimensions(), yd = y->dimensions();
  if (auto e = Check(xd.size() == 2 && pd.size() == 3 && ad.size() == 3 && yd.size() == 2, "operand ranks");
      e.failure()) return e;
  Problem p;
  p.M = xd[0];
  p.K = k;
  p.q = pd[0];
  p.N = pd[1];
  p.W = pd[2];
  p.C = (k + 7) / 8;
  p.G = ad[1];
  p.gs = group_size < 0 ? p.C * 8 : group_size;
  if (auto e = Check(xd[1] == k && p.W == (k + 31) / 32, "x [M, K] and planes [q, N, ceil(K/32)] expected");
      e.failure()) return e;
  if (auto e = Check(group_size < 0 || (group_size > 0 && group_size % 8 == 0), "group_size: -1 or a multiple of 8");
      e.failure()) return e;
  if (auto e = Check(ad[0] == p.N && ad[2] == p.q && p.G == (group_size < 0 ? 1 : (k + group_size - 1) / group_size)
                     && yd[0] == p.M && yd[1] == p.N, "alpha [N, G, q] and y [M, N] expected"); e.failure()) return e;
  if (auto e = Check(!has_offset || (offset.dimensions().size() == 2 && offset.dimensions()[0] == p.N &&
                                     offset.dimensions()[1] == p.G && offset.element_type() == alpha.element_type()),
                     "offset [N, G] in alpha's dtype expected"); e.failure()) return e;
  switch (alpha.element_type()) {
    case ffi::DataType::F16: p.type = ScaleType::kF16; break;
    case ffi::DataType::BF16: p.type = ScaleType::kBF16; break;
    case ffi::DataType::F32: p.type = ScaleType::kF32; break;
    default: return ffi::Error::InvalidArgument("qjax cpu lut_gemm: alpha must be f16, bf16 or f32");
  }
  p.x = x.typed_data();
  p.planes = planes.typed_data();
  p.alpha = alpha.untyped_data();
  p.offset = has_offset ? offset.untyped_data() : nullptr;
  p.y = y->typed_data();
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  std::vector<float> tables, sums;
  BuildTables(p, tables, sums);
  const float* t = tables.data();
  const float* s = sums.data();
  if (p.M * p.N * p.q * p.C < kSerialLookups) {
    Rows(p, t, s, 0, p.N);
    return ffi::Error::Success();
  }
  const int64_t chunks = (p.N + kRowsPerChunk - 1) / kRowsPerChunk;
  qjax_native::ParallelFor(pool, chunks, [&p, t, s](int64_t c) {
    Rows(p, t, s, c * kRowsPerChunk, std::min(p.N, (c + 1) * kRowsPerChunk));
  });
  return ffi::Error::Success();
}

}  // namespace qjax_lut

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxLutGemmCpu, qjax_lut::LutGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("has_offset"));

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernel", "qjax native CPU LUT-GEMM (XLA FFI handler)",
                              -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__cpu_kernel(void) {
  return qjax_native::HandlerModule(&kModule, "lut_gemm", reinterpret_cast<void*>(&QjaxLutGemmCpu));
}
