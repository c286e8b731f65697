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

inline f32x16 splat16(float x) {  // x in every lane: one broadcast (`f32x16{} + x` is an addition too)
  return f32x16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f32x16 load16(const c10::BFloat16* p) {  // a bfloat16 is the top half of a float32
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
}

inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

inline void store16(c10::BFloat16* p, f32x16 v) {  // rounded to nearest even, NaN kept, as c10 rounds one
  u32x16 bits = (u32x16)v;
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
  bits = (u32x16)(v != v) ? u32x16{} + 0x7FC0 : bits;  // a true comparison is all ones
  const u16x16 h = __builtin_convertvector(bits, u16x16);
  std::memcpy(p, &h, sizeof h);
}

// v rounded to T and back: what a PyTorch operation with a T result keeps of a float32 value
inline f32x16 round16(f32x16 v, const float*) { return v; }

inline f32x16 round16(f32x16 v, const c10::BFloat16*) {
  c10::BFloat16 h[16];
  store16(h, v);
  return load16(h);
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
inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f32x8 load8(const c10::BFloat16* p) {  // a bfloat16 is the top half of a float32
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  return (f32x8)(__builtin_convertvector(h, u32x8) << 16);
}

inline f32x8 splat8(float x) { return f32x8{x, x, x, x, x, x, x, x}; }

inline f32x8 fma8(f32x8 a, f32x8 b, f32x8 c) {  // fma16's instruction on 8 lanes
#if defined(__FMA__)
  return (f32x8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// sum16 of the 16 lanes lo then hi, bit for bit: the same additions in the same order
inline float sum8x2(f32x8 lo, f32x8 hi) {
  const f32x8 a = lo + hi;
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline float max16(f32x16 v) {  // the largest lane (exact: any order gives it)
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

inline float max_of(const float* x, int64_t n) {  // the largest of x[0 .. n), 16 at a time; NaN passed over
  const float inf = __builtin_inff();
  const int64_t n16 = n / 16 * 16;
  f32x16 top = splat16(-inf);
  for (int64_t i = 0; i < n16; i += 16) {
    const f32x16 v = load16(x + i);
    top = v > top ? v : top;
  }
  float m = max16(top);
  for (int64_t i = n16; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

inline float sum16(f32x16 v) {  // halves added pairwise: 4 vector adds, not 15 scalar ones
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// e^x, 16 at a time, for x up to 88 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-5
// polynomial in r, then 2^n in the exponent bits): relative error ~1e-7. x below -87, -inf too, counts
// as -87: about 1e-38, not 0 (a sum beside a term of 1 does not see it; a probability would). Each lane
// on its own, so a value gets the same result in any vector.
inline f32x16 exp16(f32x16 x) {
  const f32x16 lowest = f32x16{} - 87.0f, highest = f32x16{} + 88.0f;
  x = x < lowest ? lowest : x;
  x = x > highest ? highest : x;
  const f32x16 z = x * 1.44269504088896341f + 0.5f;
  i32x16 n = __builtin_convertvector(z, i32x16);  // toward zero, then down to floor(z)
  n += (i32x16)(__builtin_convertvector(n, f32x16) > z);  // a true comparison is -1
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  const f32x16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  f32x16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * (f32x16)((n + 127) << 23);
}

}  // namespace medusa_cpu
