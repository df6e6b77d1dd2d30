// Helpers shared by the two CPU attention kernels: the general blocked
// online-softmax kernel (attention.cpp) and the small-problem register-tile
// path (attention_small.cpp).
#pragma once

#include "common.h"

#include <algorithm>
#include <cstdlib>

namespace prism {
namespace attn {

using at::vec::Vectorized;

// The helpers have internal linkage (anonymous namespace), as when they lived
// in one .cpp: each kernel's translation unit gets its own copy, which GCC
// inlines as freely as before the split (with external linkage it inlined
// less, and the paper-shape fp32 kernel was ~5% slower).
namespace {

// Rows are handed to BLAS with the row stride as leading dimension, which must
// be >= d: read in place when stride(-1) == 1 and rows do not overlap (any
// batch / head / row strides, e.g. transposed views); otherwise copy.
inline at::Tensor rows_readable(const at::Tensor& t) {
  const int64_t d = t.size(-1);
  const bool last_ok = t.stride(-1) == 1 || d == 1;
  const bool rows_ok = t.size(-2) <= 1 || t.stride(-2) >= d;
  return last_ok && rows_ok ? t : t.contiguous();
}

// Leading dimension for BLAS: a single row may carry any stride.
inline int64_t row_ld(const at::Tensor& t) {
  return t.size(-2) <= 1 ? t.size(-1) : t.stride(-2);
}


template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();  // ~20 ulp, exp(-inf) = 0; plenty below the fp32 tolerance
  } else {
    return x.exp();
  }
}

// s[j] += bias[j]; returns max_j s[j] (one pass). The tail is one masked
// vector, blended with -inf for the max (a scalar loop re-reading the masked
// store stalled on store forwarding: ~5% of the kernel at Nk ~ 100).
template <typename T>
inline T add_bias_max(T* s, const T* bias, int64_t n) {
  using V = Vectorized<T>;
  const T ninf = -std::numeric_limits<T>::infinity();
  V vm(ninf);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    V x = V::loadu(s + j) + V::loadu(bias + j);
    x.store(s + j);
    vm = at::vec::maximum(vm, x);
  }
  if (j < n) {
    const int64_t rest = n - j;
    V x = V::loadu(s + j, rest) + V::loadu(bias + j, rest);
    x.store(s + j, rest);
    vm = at::vec::maximum(vm, V::set(V(ninf), x, rest));
  }
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vm);
}

template <typename T>
inline T row_max(const T* s, int64_t n) {
  using V = Vectorized<T>;
  const T ninf = -std::numeric_limits<T>::infinity();
  V vm(ninf);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) vm = at::vec::maximum(vm, V::loadu(s + j));
  if (j < n) vm = at::vec::maximum(vm, V::set(V(ninf), V::loadu(s + j, n - j), n - j));
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vm);
}

// s[j] = exp(s[j] - m); returns the sum.
template <typename T>
inline T exp_sum(T* s, T m, int64_t n) {
  using V = Vectorized<T>;
  const V vm(m);
  V vsum(T(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    V e = vexp(V::loadu(s + j) - vm);
    e.store(s + j);
    vsum = vsum + e;
  }
  if (j < n) {  // tail: one masked vector instead of scalar std::exp calls
    const int64_t rest = n - j;
    V e = vexp(V::loadu(s + j, rest) - vm);
    e.store(s + j, rest);
    vsum = vsum + V::set(V(T(0)), e, rest);
  }
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, vsum);
}

template <typename T>
inline void scale_row(T* x, T a, int64_t n) {
  using V = Vectorized<T>;
  const V va(a);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

template <typename src_t, typename dst_t>
inline void convert_rows(const src_t* src, int64_t ld_src, dst_t* dst, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) widen(src + r * ld_src, dst + r * d, d);
}

}  // namespace

// The small-problem path (attention_small.cpp): fp32, d = 64, Nk <= 512, on
// AVX512 builds. Computes out and lse and returns true when it applies to
// these inputs; returns false (and touches nothing) otherwise, e.g. on the
// DEFAULT / AVX2 builds or with PRISM_ATTN_SMALL=0.
bool attention_small_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor* bias, const at::Tensor* q_pos, const at::Tensor* k_pos,
                         float scale, at::Tensor& out, at::Tensor& lse);

// The decode path (attention_decode.cpp): split over the keys for few queries
// and long key lists. decode_chunk() is the one place that decides: the keys
// per chunk to use for this shape and thread count, or 0 for "not this path"
// (also when it is switched off). attention_decode() runs it with that chunk
// (any chunk > 0 is valid: tests force small ones); returns false for chunk <= 0.
int64_t decode_chunk(int64_t B, int64_t H, int64_t Hkv, int64_t Nq, int64_t Nk, int64_t threads);
bool attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor* bias, const at::Tensor* q_pos, const at::Tensor* k_pos,
                      double scale, int64_t chunk, at::Tensor& out, at::Tensor& lse);
bool set_decode_enabled(bool on);  // returns the previous setting
int64_t decode_calls();            // how many times the decode path ran (tests)

}  // namespace attn
}  // namespace prism
