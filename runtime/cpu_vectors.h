// 16 float32 lanes (GCC vector extensions: one AVX-512 register where the CPU has it; otherwise GCC
// keeps one in memory, so hot loops there hold two 8-lane halves: `load8` and below) and what our CPU
// kernels do with them. Every function here is lane by lane or sums in a fixed order, so the same
// inputs give the same bits wherever a kernel calls it.

#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <immintrin.h>

namespace medusa_cpu {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

inline f32x16 splat16(float x) {  // x in every lane: one broadcast (`f32x16{} + x` is an addition too)
  return f32x16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

// The integer vectors of a float vector's lanes, for code written once for 16 and 8 lanes
template <typename F>
struct Lanes;
template <>
struct Lanes<f32x16> {
  using i32 = i32x16;
  using u32 = u32x16;
  using u16 = u16x16;
};
template <>
struct Lanes<f32x8> {
  using i32 = i32x8;
  using u32 = u32x8;
  using u16 = u16x8;
};

template <typename F>
inline F load_lanes(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename F>
inline F load_lanes(const c10::BFloat16* p) {  // a bfloat16 is the top half of a float32
#if defined(__AVX2__)
  // GCC widens 8 lanes as two halves of 4 joined (6 instructions, where one vpmovzxwd does it): AMD
  // EPYC (Zen 3, AVX2), bf16, taking turns in one process, all SmolLM2's products on one row 11.00 ->
  // 10.06 ms (2 threads); one token's attention over 300 keys 67.8 -> 41.0 us (1 thread; float32 35.3)
  if constexpr (sizeof(F) == 32)
    return (F)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#endif
  typename Lanes<F>::u16 h;
  std::memcpy(&h, p, sizeof h);
  return (F)(__builtin_convertvector(h, typename Lanes<F>::u32) << 16);
}

template <typename F>
inline void store_lanes(float* p, F v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename F>
inline void store_lanes(c10::BFloat16* p, F v) {  // rounded to nearest even, NaN kept, as c10 rounds one
  using U32 = typename Lanes<F>::u32;
  U32 bits = (U32)v;
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  bits = (U32)(v != v) ? U32{} + 0x7FC0 : bits;  // a true comparison is all ones
  const typename Lanes<F>::u16 h = __builtin_convertvector(bits, typename Lanes<F>::u16);
  std::memcpy(p, &h, sizeof h);
}

// v rounded to T and back: what a PyTorch operation with a T result keeps of a float32 value
template <typename F>
inline F round_lanes(F v, const float*) {
  return v;
}

template <typename F>
inline F round_lanes(F v, const c10::BFloat16*) {  // store_lanes' rounding, kept in registers
  using U32 = typename Lanes<F>::u32;
  U32 bits = (U32)v;
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u;
  bits = (U32)(v != v) ? U32{} + 0x7FC00000u : bits;
  return (F)bits;
}

inline f32x16 load16(const float* p) { return load_lanes<f32x16>(p); }
inline f32x16 load16(const c10::BFloat16* p) { return load_lanes<f32x16>(p); }
inline void store16(float* p, f32x16 v) { store_lanes(p, v); }
inline void store16(c10::BFloat16* p, f32x16 v) { store_lanes(p, v); }
template <typename T>
inline f32x16 round16(f32x16 v, const T* type) {
  return round_lanes(v, type);
}

// a * b + c rounded once (one fused multiply-add per lane) where the CPU has them; a kernel that calls
// it gets the same instruction for the same sum wherever it is written, as `fp-contract=off` asks
inline f32x16 fma16(f32x16 a, f32x16 b, f32x16 c) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  const f32x8 lo = (f32x8)_mm256_fmadd_ps((__m256)__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7),
                                          (__m256)__builtin_shufflevector(b, b, 0, 1, 2, 3, 4, 5, 6, 7),
                                          (__m256)__builtin_shufflevector(c, c, 0, 1, 2, 3, 4, 5, 6, 7));
  const f32x8 hi = (f32x8)_mm256_fmadd_ps((__m256)__builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15),
                                          (__m256)__builtin_shufflevector(b, b, 8, 9, 10, 11, 12, 13, 14, 15),
                                          (__m256)__builtin_shufflevector(c, c, 8, 9, 10, 11, 12, 13, 14, 15));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return a * b + c;
#endif
}

// 8 lanes, one AVX2 register: where the CPU lacks AVX-512, GCC keeps an f32x16 in memory (it has no
// register for one) and copies it piece by piece at every use, so the hot loops there hold their
// 16 lanes as two of these (`rows_product.cpp`, `attention/cpu_attention.cpp`), the same operation per lane
inline f32x8 load8(const float* p) { return load_lanes<f32x8>(p); }
inline f32x8 load8(const c10::BFloat16* p) { return load_lanes<f32x8>(p); }

inline f32x8 splat8(float x) { return f32x8{x, x, x, x, x, x, x, x}; }

inline f32x8 fma8(f32x8 a, f32x8 b, f32x8 c) {  // fma16's instruction on 8 lanes
#if defined(__FMA__)
  return (f32x8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// sum16's last steps, on the 8 lanes its first addition leaves
inline float sum8(f32x8 a) {
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// sum16 of the 16 lanes lo then hi, bit for bit: the same additions in the same order
inline float sum8x2(f32x8 lo, f32x8 hi) {
  return sum8(lo + hi);
}

inline float sum16(f32x16 v) {  // halves added pairwise: 4 vector adds, not 15 scalar ones
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// e^x, lane by lane, for x up to 88 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-5
// polynomial in r, then 2^n in the exponent bits): relative error ~1e-7. x below -87, -inf too, counts
// as -87: about 1e-38, not 0 (a sum beside a term of 1 does not see it; a probability would). Each lane
// on its own, so a value gets the same result in any vector of either width.
template <typename F>
inline F exp_lanes(F x) {
  using I = typename Lanes<F>::i32;
  const F lowest = F{} - 87.0f, highest = F{} + 88.0f;
  x = x < lowest ? lowest : x;
  x = x > highest ? highest : x;
  const F z = x * 1.44269504088896341f + 0.5f;
  I n = __builtin_convertvector(z, I);  // toward zero, then down to floor(z)
  n += (I)(__builtin_convertvector(n, F) > z);  // a true comparison is -1
  const F nf = __builtin_convertvector(n, F);
  const F r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * (F)((n + 127) << 23);
}

inline f32x16 exp16(f32x16 x) { return exp_lanes(x); }

// The widest float32 vector a register holds here, for loops that are lane by lane (or keep the lanes
// of 16 apart: `Sum16`): 16 lanes with AVX-512, else 8 (GCC keeps a 16-lane vector in memory without
// it: above). An elementwise kernel over 8-lane vectors gives each value the bits it gets in 16.
#if defined(__AVX512F__)
using f32xN = f32x16;
#else
using f32xN = f32x8;
#endif
constexpr int kLanes = sizeof(f32xN) / sizeof(float);

template <typename T>
inline f32xN loadN(const T* p) {
  return load_lanes<f32xN>(p);
}

// SwiGLU's y = T(silu(gate)) * up, silu(g) = g / (1 + e^-g), for M rows of I: row m's gate at
// gate_up + m * ld and its up I further on, its y at y + m * ldy; a register's lanes at a time, the
// row's last values in a vector padded with zeros. `layer_ops.cpp`'s `silu_mul` runs it on whole rows,
// `rows_product.cpp`'s fused product on each pair of blocks: the same bits.
template <typename T>
void silu_mul_rows(const T* gate_up, int64_t ld, T* y, int64_t ldy, int64_t M, int64_t I) {
  auto lanes = [y](f32xN gate, f32xN up) { return round_lanes(gate / (exp_lanes(-gate) + 1.0f), y) * up; };
  const int64_t In = I / kLanes * kLanes;
  for (int64_t m = 0; m < M; ++m, gate_up += ld, y += ldy) {
    for (int64_t i = 0; i < In; i += kLanes) store_lanes(y + i, lanes(loadN(gate_up + i), loadN(gate_up + I + i)));
    if (In < I) {
      f32xN gate = {}, up = {};
      for (int64_t j = 0; In + j < I; ++j) gate[j] = float(gate_up[In + j]), up[j] = float(gate_up[I + In + j]);
      const f32xN out = lanes(gate, up);
      for (int64_t j = 0; In + j < I; ++j) y[In + j] = T(out[j]);
    }
  }
}

inline f32xN splatN(float x);

// e^(x - m), a NaN counted as -inf (~1e-38 below -87: nothing beside a term of 1): a logsumexp's terms
inline f32xN exp_from(f32xN x, float m) { return exp_lanes((x == x ? x : splatN(-__builtin_inff())) - m); }

inline f32xN splatN(float x) {
#if defined(__AVX512F__)
  return splat16(x);
#else
  return splat8(x);
#endif
}

// 16 float32 lanes as 16 / kLanes vectors in registers, summed at the end as sum16 sums one vector:
// a reduction written with it gives the bits of the 16-lane one on either kind of CPU
struct Sum16 {
  f32xN part[16 / kLanes] = {};

  // lane i += f(the vector at p's lane i), for 16 values from p
  template <typename T, typename F>
  void add(const T* p, F f) {
    for (int j = 0; j < 16 / kLanes; ++j) part[j] += f(loadN(p + j * kLanes));
  }
  float total() const {
#if defined(__AVX512F__)
    return sum16(part[0]);
#else
    return sum8x2(part[0], part[1]);
#endif
  }
};

inline float max_of(const float* x, int64_t n) {  // the largest of x[0 .. n), a register at a time; NaN passed over
  const float inf = __builtin_inff();
  const int64_t whole = n / kLanes * kLanes;
  f32xN top = splatN(-inf);
  for (int64_t i = 0; i < whole; i += kLanes) {
    const f32xN v = loadN(x + i);
    top = v > top ? v : top;
  }
  float m = top[0];
  for (int i = 1; i < kLanes; ++i) m = top[i] > m ? top[i] : m;
  for (int64_t i = whole; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

}  // namespace medusa_cpu
