// Native CPU qmatmul for QArray weights (decode, small M), as an XLA FFI handler in a Python extension module.
//
//   y[m, n] = sum_g scale[n, g] * (sum_{k in g} code[n, k] * x[m, k]  -  zero[n, g] * sum_{k in g} x[m, k])
//
// which equals x @ W^T for W[n, k] = scale[n, k / g] * (code[n, k] - zero[n, k / g]) in real arithmetic.
//
// Operands: x f32 [M, K]; codes u32 [N, ceil(K / 32) * bits] (each row a little-endian bit stream, code k at bit
// bits * k, zero-padded to a multiple of 32 codes: see qjax/core/packing.py); scale [N, G] f16, bf16 or f32;
// zero u8 [N, G] (read only when has_zero, else the constant 2**bits / 2); result y f32 [M, N].
// Attributes: bits (1..8), group_size (-1: per channel; else a multiple of the codes per unit, see Layout), k,
// has_zero, force_scalar (tests: run the portable path).
//
// The AVX2 path (chosen at run time, never by compile flags) reads 8 "units" at once (a unit: one word for 1, 2, 4,
// 8 bits; `bits` words = 32 codes otherwise, de-interleaved by permutes for 3 bits, gathered for 5..7), decodes
// each code slot with a shift and/or a mask and FMAs it against a copy of x re-laid out once per call so that slot
// p of 8 consecutive units meets 8 contiguous floats. A code decoded in place (masked, not shifted: value
// code << off) meets x * 2^-off, a code straddling two words is the sum of its two parts, each with its
// power-of-two factor: all exact. Per group the products accumulate in a few independent chains, then are scaled
// once. Output rows are split over the FFI intra-op thread pool and the calling thread. Non-x86 builds and CPUs
// without AVX2/FMA/F16C run the portable scalar path.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__x86_64__) || defined(__i386__)
#define QJAX_X86 1
#include <immintrin.h>
#else
#define QJAX_X86 0
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "../native.h"

namespace ffi = xla::ffi;

namespace qjax_cpu {

using qjax_native::Bf16ToFloat;
using qjax_native::HalfToFloat;
using qjax_native::HasAvx2;
using qjax_native::ScaleType;

constexpr int kLanes = 8;
constexpr int kMaxRows = 4;  // x rows processed per pass over a weight row

// ---------------------------------------------------------------------------------------------------------------
// Packing layout: the slots of one unit. Slot value = (word[w] >> shift) & mask, contributing value * x[code] *
// 2^exp.

struct Slot {
  int word;
  int shift;
  uint32_t mask;
  int code;
  int exp;
};

constexpr int UnitWords(int bits) { return 32 % bits == 0 ? 1 : bits; }
constexpr int UnitCodes(int bits) { return UnitWords(bits) * 32 / bits; }

constexpr int NumSlots(int bits) {
  int n = 0;
  for (int j = 0; j < UnitCodes(bits); ++j) n += ((bits * j) % 32 + bits > 32) ? 2 : 1;
  return n;
}

template <int B>
constexpr std::array<Slot, NumSlots(B)> MakeSlots() {
  std::array<Slot, NumSlots(B)> t{};
  int p = 0;
  const uint32_t low = (1u << B) - 1;
  for (int j = 0; j < UnitCodes(B); ++j) {
    const int word = (B * j) / 32, off = (B * j) % 32;
    if (off + B <= 31) {  // in place: value = code << (off - base), base: a shift shared by 8 slots (1, 2 bits)
      const int base = B <= 2 ? off - off % (8 * B) : 0;
      t[p++] = Slot{word, base, low << (off - base), j, base - off};
    } else if (off + B == 32) {
      t[p++] = Slot{word, off, 0xFFFFFFFFu, j, 0};        // top of the word: a shift alone
    } else {
      const int hi_bits = off + B - 32;
      t[p++] = Slot{word, off, 0xFFFFFFFFu, j, 0};        // low part, top of this word
      t[p++] = Slot{word + 1, 0, (1u << hi_bits) - 1, j, 32 - off};  // high part, bottom of the next word
    }
  }
  return t;
}

template <int B>
struct Layout {
  static constexpr int kUnitWords = UnitWords(B);
  static constexpr int kCodes = UnitCodes(B);
  static constexpr int kSlots = NumSlots(B);
  static constexpr std::array<Slot, kSlots> kTable = MakeSlots<B>();
};

inline uint32_t Code(const uint32_t* row, int bits, int64_t k) {
  const int64_t bit = bits * k;
  const int64_t w = bit >> 5;
  const int off = static_cast<int>(bit & 31);
  uint32_t v = row[w] >> off;
  if (off + bits > 32) v |= row[w + 1] << (32 - off);
  return v & ((1u << bits) - 1);
}


// ---------------------------------------------------------------------------------------------------------------
// Per-call problem description and the x-side precomputation (shared by all rows).

struct Problem {
  int bits;
  int64_t M, N, K, G, gs;       // gs: the group size (K when per channel)
  int64_t kw;                   // words per row
  int64_t kpad;                 // codes per row including padding (kw * 32 / bits)
  const float* x;
  const uint32_t* codes;
  const void* scale;
  ScaleType scale_type;
  const uint8_t* zero;          // null: symmetric
  float* y;
  // x side
  std::vector<float> xpad;      // [M, kpad], zero-padded
  std::vector<float> xsum;      // [M, G]
  // vector path
  int64_t units, nfull;         // units per row, full blocks of kLanes units
  int64_t xd_stride;            // floats per x row in xd
  std::vector<float> xd;        // [M, nfull, slots, kLanes]
  bool single;                  // every block lies in one group
  int64_t bpg;                  // blocks per group (single mode)
  std::vector<int32_t> blk_g0;  // first group of each block (multi mode)
  std::vector<int32_t> blk_rel; // group of each lane relative to blk_g0 (multi mode)
};

void PrepareX(Problem& p) {
  p.xpad.assign(p.M * p.kpad, 0.0f);
  p.xsum.assign(p.M * p.G, 0.0f);
  for (int64_t m = 0; m < p.M; ++m) {
    std::memcpy(&p.xpad[m * p.kpad], p.x + m * p.K, p.K * sizeof(float));
    for (int64_t g = 0; g < p.G; ++g) {
      float acc = 0.0f;
      for (int64_t k = g * p.gs; k < std::min((g + 1) * p.gs, p.K); ++k) acc += p.x[m * p.K + k];
      p.xsum[m * p.G + g] = acc;
    }
  }
}

template <int B>
void PrepareVector(Problem& p) {
  using L = Layout<B>;
  p.units = p.kw / L::kUnitWords;
  p.nfull = p.units / kLanes;
  p.xd_stride = p.nfull * L::kSlots * kLanes;
  p.xd.assign(p.M * p.xd_stride, 0.0f);
  float factor[L::kSlots];  // 2^exp: exact
  for (int s = 0; s < L::kSlots; ++s) factor[s] = std::ldexp(1.0f, L::kTable[s].exp);
  for (int64_t m = 0; m < p.M; ++m) {
    const float* xr = &p.xpad[m * p.kpad];
    float* out = &p.xd[m * p.xd_stride];
    for (int64_t b = 0; b < p.nfull; ++b)
      for (int s = 0; s < L::kSlots; ++s)
        for (int l = 0; l < kLanes; ++l)
          out[(b * L::kSlots + s) * kLanes + l] = xr[(b * kLanes + l) * L::kCodes + L::kTable[s].code] * factor[s];
  }
  const int64_t block_codes = int64_t{kLanes} * L::kCodes;
  p.single = p.G == 1 || p.gs % block_codes == 0;
  p.bpg = p.G == 1 ? std::max<int64_t>(p.nfull, 1) : p.gs / block_codes;
  if (p.single) return;
  p.blk_g0.resize(p.nfull);
  p.blk_rel.resize(p.nfull * kLanes);
  for (int64_t b = 0; b < p.nfull; ++b) {
    const int64_t g0 = std::min(b * block_codes / p.gs, p.G - 1);
    p.blk_g0[b] = static_cast<int32_t>(g0);
    for (int l = 0; l < kLanes; ++l)
      p.blk_rel[b * kLanes + l] = static_cast<int32_t>(std::min((b * kLanes + l) * L::kCodes / p.gs, p.G - 1) - g0);
  }
}

// The zero-point term sum_g s_g * z_g * xsum[m, g] of rows m0..m0+mt.
void ZeroTerm(const Problem& p, int64_t n, const float* s, int64_t m0, int mt, float* out) {
  const float zc = static_cast<float>(1 << (p.bits - 1));
  const uint8_t* z = p.zero ? p.zero + n * p.G : nullptr;
  for (int i = 0; i < mt; ++i) {
    const float* xs = &p.xsum[(m0 + i) * p.G];
    float acc = 0.0f;
    for (int64_t g = 0; g < p.G; ++g) acc += s[g] * (z ? static_cast<float>(z[g]) : zc) * xs[g];
    out[i] = acc;
  }
}

// Adds the codes k0..kpad (past the full blocks) of a weight row, one by one, for rows m0..m0+mt.
void Tail(const Problem& p, const uint32_t* row, const float* s, int64_t k0, int64_t m0, int mt, float* out) {
  for (int64_t k = k0; k < p.kpad; ++k) {
    const float c = static_cast<float>(Code(row, p.bits, k)) * s[std::min(k / p.gs, p.G - 1)];
    for (int i = 0; i < mt; ++i) out[i] += c * p.xpad[(m0 + i) * p.kpad + k];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Portable scalar path.

void ScalesScalar(const Problem& p, int64_t n, float* s) {
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t i = n * p.G + g;
    switch (p.scale_type) {
      case ScaleType::kF16: s[g] = HalfToFloat(static_cast<const uint16_t*>(p.scale)[i]); break;
      case ScaleType::kBF16: s[g] = Bf16ToFloat(static_cast<const uint16_t*>(p.scale)[i]); break;
      case ScaleType::kF32: s[g] = static_cast<const float*>(p.scale)[i]; break;
    }
  }
}

void RowsScalar(const Problem& p, int64_t n0, int64_t n1) {
  std::vector<float> s(p.G), w(p.K);
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* row = p.codes + n * p.kw;
    ScalesScalar(p, n, s.data());
    for (int64_t k = 0; k < p.K; ++k) w[k] = static_cast<float>(Code(row, p.bits, k));
    const float zc = static_cast<float>(1 << (p.bits - 1));
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xr = p.x + m * p.K;
      float y = 0.0f;
      for (int64_t g = 0; g < p.G; ++g) {
        float acc = 0.0f;
        for (int64_t k = g * p.gs; k < std::min((g + 1) * p.gs, p.K); ++k) acc += w[k] * xr[k];
        const float z = p.zero ? static_cast<float>(p.zero[n * p.G + g]) : zc;
        y += s[g] * (acc - z * p.xsum[m * p.G + g]);
      }
      p.y[m * p.N + n] = y;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C path (compiled for that target only; chosen at run time).

#if QJAX_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define QJAX_INLINE inline __attribute__((always_inline))

// Slot P of a block feeds accumulator chain P % NA of each x row (acc[i * NA + P % NA]): independent chains hide
// the FMA latency over long groups. First: the block opens a group, its first product per chain initializes it.
template <int B, int MT, int NA, bool First, int P = 0>
QJAX_INLINE void Slots(const __m256i* w, const float* xd, int64_t stride, __m256* acc) {
  if constexpr (P < Layout<B>::kSlots) {
    constexpr Slot s = Layout<B>::kTable[P];
    constexpr int a = P % NA;
    __m256i v = w[s.word];
    if constexpr (s.shift != 0) v = _mm256_srli_epi32(v, s.shift);
    if constexpr (s.mask != 0xFFFFFFFFu) v = _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(s.mask)));
    const __m256 f = _mm256_cvtepi32_ps(v);
    for (int i = 0; i < MT; ++i) {
      const __m256 xv = _mm256_loadu_ps(xd + i * stride + P * kLanes);
      if constexpr (First && P < NA) acc[i * NA + a] = _mm256_mul_ps(f, xv);
      else acc[i * NA + a] = _mm256_fmadd_ps(f, xv, acc[i * NA + a]);
    }
    Slots<B, MT, NA, First, P + 1>(w, xd, stride, acc);
  }
}

// The lane-wise products of block b (kLanes units) with x rows m0..m0+MT into the accumulators (see Slots).
template <int B, int MT, int NA, bool First>
QJAX_INLINE void Block(const uint32_t* row, int64_t b, const float* xd, int64_t stride, __m256* acc) {
  using L = Layout<B>;
  static_assert(L::kSlots >= NA, "every chain needs a first slot");
  __m256i w[L::kUnitWords];
  const uint32_t* src = row + b * kLanes * L::kUnitWords;
  if constexpr (L::kUnitWords == 1) {
    w[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  } else if constexpr (L::kUnitWords == 3) {  // 8 triples: a 3 x 8 transpose of 24 words by permutes and blends
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 8));
    const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16));
    const __m256i i0 = _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5), i1 = _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6);
    const __m256i i2 = _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7);
    w[0] = _mm256_blend_epi32(_mm256_blend_epi32(_mm256_permutevar8x32_epi32(v0, i0),
                                                 _mm256_permutevar8x32_epi32(v1, i0), 0x38),
                              _mm256_permutevar8x32_epi32(v2, i0), 0xC0);
    w[1] = _mm256_blend_epi32(_mm256_blend_epi32(_mm256_permutevar8x32_epi32(v0, i1),
                                                 _mm256_permutevar8x32_epi32(v1, i1), 0x18),
                              _mm256_permutevar8x32_epi32(v2, i1), 0xE0);
    w[2] = _mm256_blend_epi32(_mm256_blend_epi32(_mm256_permutevar8x32_epi32(v0, i2),
                                                 _mm256_permutevar8x32_epi32(v1, i2), 0x1C),
                              _mm256_permutevar8x32_epi32(v2, i2), 0xE0);
  } else {  // 5, 6, 7 bits: gathers
    constexpr int U = L::kUnitWords;
    const __m256i idx = _mm256_setr_epi32(0, U, 2 * U, 3 * U, 4 * U, 5 * U, 6 * U, 7 * U);
    for (int c = 0; c < U; ++c) w[c] = _mm256_i32gather_epi32(reinterpret_cast<const int*>(src + c), idx, 4);
  }
  Slots<B, MT, NA, First>(w, xd + b * L::kSlots * kLanes, stride, acc);
}

QJAX_INLINE float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// total += acc * sv, chain by chain.
template <int N>
QJAX_INLINE void Scale(const __m256* acc, __m256 sv, __m256* total) {
  for (int i = 0; i < N; ++i) total[i] = _mm256_fmadd_ps(acc[i], sv, total[i]);
}

// Rows m0..m0+MT of x against weight row n; s: the row's scales as f32, kLanes zeros past G.
template <int B, int MT, int NA>
void RowAvx2(const Problem& p, int64_t n, const float* s, int64_t m0, float* out) {
  constexpr int NV = MT * NA;
  const uint32_t* row = p.codes + n * p.kw;
  const float* xd = p.xd.data() + m0 * p.xd_stride;
  __m256 total[NV], acc[NV];
  for (int i = 0; i < NV; ++i) total[i] = _mm256_setzero_ps();
  if (p.single) {
    for (int64_t b0 = 0, g = 0; b0 < p.nfull; b0 += p.bpg, ++g) {
      Block<B, MT, NA, true>(row, b0, xd, p.xd_stride, acc);
      const int64_t b1 = std::min(b0 + p.bpg, p.nfull);
      for (int64_t b = b0 + 1; b < b1; ++b) Block<B, MT, NA, false>(row, b, xd, p.xd_stride, acc);
      Scale<NV>(acc, _mm256_set1_ps(s[g]), total);
    }
  } else {
    for (int64_t b = 0; b < p.nfull; ++b) {
      Block<B, MT, NA, true>(row, b, xd, p.xd_stride, acc);
      const __m256i rel = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&p.blk_rel[b * kLanes]));
      Scale<NV>(acc, _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + p.blk_g0[b]), rel), total);
    }
  }
  float zt[MT], tail[MT] = {};
  ZeroTerm(p, n, s, m0, MT, zt);
  Tail(p, row, s, p.nfull * kLanes * Layout<B>::kCodes, m0, MT, tail);
  for (int i = 0; i < MT; ++i) {
    __m256 t = total[i * NA];
    for (int a = 1; a < NA; ++a) t = _mm256_add_ps(t, total[i * NA + a]);
    out[i] = HSum(t) + tail[i] - zt[i];
  }
}

// Chains per x row: 4 / MT over long groups (several blocks), 2 / MT when every block opens a group (the blocks'
// chains are then independent of each other anyway); at least one.
template <int B, int MT>
void RowChains(const Problem& p, int64_t n, const float* s, int64_t m0, float* out) {
  constexpr int kLong = MT >= 4 ? 1 : 4 / MT, kShort = MT >= 2 ? 1 : 2;
  if (p.single && p.bpg >= 2) RowAvx2<B, MT, kLong>(p, n, s, m0, out);
  else RowAvx2<B, MT, kShort>(p, n, s, m0, out);
}

void ScalesAvx2(const Problem& p, int64_t n, float* s) {
  int64_t g = 0;
  if (p.scale_type == ScaleType::kF16) {
    const uint16_t* src = static_cast<const uint16_t*>(p.scale) + n * p.G;
    for (; g + 8 <= p.G; g += 8)
      _mm256_storeu_ps(s + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + g))));
    for (; g < p.G; ++g) s[g] = _cvtsh_ss(src[g]);
  } else {
    ScalesScalar(p, n, s);
  }
}

template <int B>
void RowsAvx2(const Problem& p, int64_t n0, int64_t n1) {
  std::vector<float> s(p.G + kLanes, 0.0f);
  float out[kMaxRows];
  for (int64_t n = n0; n < n1; ++n) {
    ScalesAvx2(p, n, s.data());
    for (int64_t m0 = 0; m0 < p.M; m0 += kMaxRows) {
      const int mt = static_cast<int>(std::min<int64_t>(kMaxRows, p.M - m0));
      switch (mt) {
        case 1: RowChains<B, 1>(p, n, s.data(), m0, out); break;
        case 2: RowChains<B, 2>(p, n, s.data(), m0, out); break;
        case 3: RowChains<B, 3>(p, n, s.data(), m0, out); break;
        default: RowChains<B, 4>(p, n, s.data(), m0, out); break;
      }
      for (int i = 0; i < mt; ++i) p.y[(m0 + i) * p.N + n] = out[i];
    }
  }
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86: the portable path only
template <int B>
void RowsAvx2(const Problem&, int64_t, int64_t) {}
#endif  // QJAX_X86

using RowsFn = void (*)(const Problem&, int64_t, int64_t);

template <int B>
RowsFn PrepareAvx2(Problem& p) {
  PrepareVector<B>(p);
  return &RowsAvx2<B>;
}

RowsFn Prepare(Problem& p, bool force_scalar) {
  PrepareX(p);
  if (force_scalar || !HasAvx2()) return &RowsScalar;
  switch (p.bits) {
    case 1: return PrepareAvx2<1>(p);
    case 2: return PrepareAvx2<2>(p);
    case 3: return PrepareAvx2<3>(p);
    case 4: return PrepareAvx2<4>(p);
    case 5: return PrepareAvx2<5>(p);
    case 6: return PrepareAvx2<6>(p);
    case 7: return PrepareAvx2<7>(p);
    default: return PrepareAvx2<8>(p);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Threading: chunks of output rows over the pool (qjax_native::ParallelFor).

void ParallelRows(ffi::ThreadPool& pool, const Problem& p, RowsFn rows) {
  // Chunks of ~16K words x row-passes (a few microseconds): small enough that a helper preempted inside one delays
  // the caller little, large enough that claiming costs nothing.
  const int64_t row_work = p.kw * ((p.M + kMaxRows - 1) / kMaxRows);
  const int64_t per = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(row_work, 1));
  qjax_native::ParallelFor(pool, (p.N + per - 1) / per,
                           [&p, rows, per](int64_t c) { rows(p, c * per, std::min(p.N, (c + 1) * per)); });
}

// ---------------------------------------------------------------------------------------------------------------
// The FFI handler.

ffi::Error Check(bool ok, const std::string& what) {
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument("qjax cpu qmatmul: " + what);
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> codes,
                       ffi::AnyBuffer scale, ffi::Buffer<ffi::U8> zero, ffi::ResultBuffer<ffi::F32> y,
                       int64_t bits, int64_t group_size, int64_t k, int64_t has_zero, int64_t force_scalar) {
  const auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (auto e = Check(xd.size() == 2 && cd.size() == 2 && sd.size() == 2 && yd.size() == 2, "operands must be 2-D");
      e.failure()) return e;
  if (auto e = Check(bits >= 1 && bits <= 8, "bits must be in 1..8"); e.failure()) return e;
  Problem p;
  p.bits = static_cast<int>(bits);
  p.M = xd[0];
  p.K = k;
  p.N = cd[0];
  p.kw = cd[1];
  p.G = sd[1];
  p.gs = group_size < 0 ? k : group_size;
  p.kpad = p.kw * 32 / bits;
  const int64_t ucodes = UnitCodes(p.bits);
  if (auto e = Check(xd[1] == k && p.kw == (k + 31) / 32 * bits, "x [M, K] and codes [N, ceil(K/32)*bits] expected");
      e.failure()) return e;
  if (auto e = Check(sd[0] == p.N && p.G == (k + p.gs - 1) / p.gs && yd[0] == p.M && yd[1] == p.N,
                     "scale [N, ceil(K/group)] and y [M, N] expected"); e.failure()) return e;
  if (auto e = Check(group_size < 0 || (group_size > 0 && group_size % ucodes == 0),
                     "group_size must be -1 or a multiple of " + std::to_string(ucodes)); e.failure()) return e;
  if (auto e = Check(!has_zero || (zero.dimensions().size() == 2 && zero.dimensions()[0] == p.N &&
                                   zero.dimensions()[1] == p.G), "zero [N, G] expected"); e.failure()) return e;
  switch (scale.element_type()) {
    case ffi::DataType::F16: p.scale_type = ScaleType::kF16; break;
    case ffi::DataType::BF16: p.scale_type = ScaleType::kBF16; break;
    case ffi::DataType::F32: p.scale_type = ScaleType::kF32; break;
    default: return ffi::Error::InvalidArgument("qjax cpu qmatmul: scale must be f16, bf16 or f32");
  }
  p.x = x.typed_data();
  p.codes = codes.typed_data();
  p.scale = scale.untyped_data();
  p.zero = has_zero ? zero.typed_data() : nullptr;
  p.y = y->typed_data();
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  const RowsFn rows = Prepare(p, force_scalar != 0);
  ParallelRows(pool, p, rows);
  return ffi::Error::Success();
}

}  // namespace qjax_cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(QjaxQMatmulCpu, qjax_cpu::QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("has_zero")
                                  .Attr<int64_t>("force_scalar"));

// ---------------------------------------------------------------------------------------------------------------
// The Python module: each handler as a PyCapsule attribute, and whether the AVX2 path is used.

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernel", "qjax native CPU qmatmul (XLA FFI handlers)",
                              -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__cpu_kernel(void) {
  return qjax_native::HandlerModule(&kModule, "qmatmul", reinterpret_cast<void*>(&QjaxQMatmulCpu));
}
