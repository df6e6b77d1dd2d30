// Helpers shared by the CPU attention kernels: the general blocked
// online-softmax kernel (attention.cpp) and the small-problem register-tile
// path (attention_small.cpp) and the split-key decode path (attention_decode.cpp).
#pragma once

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>

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

// A block of `cols` key and value rows as acc_t rows for BLAS: read in place when the
// storage type is the accumulation type (fp32, fp64), else widened (fp16, bf16) into
// kbuf / vbuf with leading dimension d.
template <typename acc_t>
struct KVRows {
  const acc_t* K;
  const acc_t* V;
  int64_t ldk, ldv;
};

template <typename acc_t, typename scalar_t>
inline KVRows<acc_t> kv_rows(const scalar_t* ksrc, int64_t ksN, const scalar_t* vsrc, int64_t vsN,
                             int64_t cols, int64_t d, acc_t* kbuf, acc_t* vbuf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return {ksrc, vsrc, ksN, vsN};
  } else {
    convert_rows(ksrc, ksN, kbuf, cols, d);
    convert_rows(vsrc, vsN, vbuf, cols, d);
    return {kbuf, vbuf, d, d};
  }
}

// The operands of one attention call as the kernels read them: q [B, H, Nq, d],
// k / v [B, Hkv, Nk, d] (rows of leading dimension row_ld), the log-count bias
// [B, Nk] in acc_t and, when causal, the query / key positions [B, N] (int64).
// Shared by attention.cpp and attention_decode.cpp.
template <typename scalar_t, typename acc_t>
struct Operands {
  const scalar_t *qd, *kd, *vd;
  int64_t qsB, qsH, qsN, ksB, ksH, ksN, vsB, vsH, vsN;
  const acc_t* bd;
  int64_t bsB;
  bool causal;
  const int64_t *qpd, *kpd;
  int64_t qpsB, kpsB;

  Operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* bias,
           const at::Tensor* q_pos, const at::Tensor* k_pos)
      : qd(q.const_data_ptr<scalar_t>()), kd(k.const_data_ptr<scalar_t>()), vd(v.const_data_ptr<scalar_t>()),
        qsB(q.stride(0)), qsH(q.stride(1)), qsN(row_ld(q)),
        ksB(k.stride(0)), ksH(k.stride(1)), ksN(row_ld(k)),
        vsB(v.stride(0)), vsH(v.stride(1)), vsN(row_ld(v)),
        bd(bias ? bias->const_data_ptr<acc_t>() : nullptr), bsB(bias ? bias->stride(0) : 0),
        causal(q_pos != nullptr),
        qpd(causal ? q_pos->const_data_ptr<int64_t>() : nullptr),
        kpd(causal ? k_pos->const_data_ptr<int64_t>() : nullptr),
        qpsB(causal ? q_pos->stride(0) : 0), kpsB(causal ? k_pos->stride(0) : 0) {}

  // Query row i of head h (leading dimension qsN between rows).
  const scalar_t* q_row(int64_t b, int64_t h, int64_t i) const { return qd + b * qsB + h * qsH + i * qsN; }
  // Key / value rows j0 .. j0 + cols - 1 of K/V head hk, as acc_t rows (kv_rows).
  KVRows<acc_t> kv(int64_t b, int64_t hk, int64_t j0, int64_t cols, int64_t d, acc_t* kbuf, acc_t* vbuf) const {
    return kv_rows<acc_t>(kd + b * ksB + hk * ksH + j0 * ksN, ksN, vd + b * vsB + hk * vsH + j0 * vsN, vsN,
                          cols, d, kbuf, vbuf);
  }
  // log c of keys j0..; nullptr without a bias.
  const acc_t* bias_row(int64_t b, int64_t j0) const { return bd ? bd + b * bsB + j0 : nullptr; }
  // Positions of queries i0.. / keys j0..; nullptr when not causal.
  const int64_t* q_pos(int64_t b, int64_t i0) const { return causal ? qpd + b * qpsB + i0 : nullptr; }
  const int64_t* k_pos(int64_t b, int64_t j0) const { return causal ? kpd + b * kpsB + j0 : nullptr; }
};

// One key block of the online softmax, for `rows` query rows (Q, ld ldq) against
// `cols` keys (K, ld ldk) and values (Vp, ld ldv): updates the running max mrow,
// sum lrow and accumulator acc (ld d) of every row. S is rows x cols scratch.
// bias_row: log c of the block's keys (nullptr: none); with need_mask, key j is
// hidden from row r when kp[j] > qp[r]. Shared by attention.cpp and
// attention_decode.cpp (one chunk of a split key list is a run of these).
template <typename acc_t>
inline void online_softmax_block(int64_t rows, int64_t cols, int64_t d, acc_t scale, const acc_t* Q,
                                 int64_t ldq, const acc_t* K, int64_t ldk, const acc_t* Vp, int64_t ldv,
                                 const acc_t* bias_row, bool need_mask, const int64_t* qp,
                                 const int64_t* kp, acc_t* S, acc_t* mrow, acc_t* lrow, acc_t* acc) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  // Online softmax over this key block, row by row. The invariant after
  // key blocks 0..kb, for every query row r, is
  //   mrow[r] = max over the keys seen so far of t_j = s_j + log c_j
  //   lrow[r] = sum_j exp(t_j - mrow[r])
  //   acc[r]  = sum_j exp(t_j - mrow[r]) * v_j        (not yet divided by l)
  // so that at the end out = acc / l and lse = m + log l.
  //
  // Step 1: scores S = scale * Q K^T for the block (rows x cols, ld cols).
  gemm_abt<acc_t>(rows, cols, d, scale, Q, ldq, K, ldk, S, cols);
  bool any = false;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* s = S + r * cols;
    // Step 2: causal mask on diagonal blocks: future keys (k_pos > q_pos)
    // get -inf, so exp() below turns them into exact zeros.
    if (need_mask) {
      const int64_t qi = qp[r];
      for (int64_t j = 0; j < cols; ++j) s[j] = kp[j] > qi ? neg_inf : s[j];
    }
    // Step 3: add the log-count bias and take the block's row maximum in
    // the same pass. The bias is added to the scores *before* the max and
    // the exp because it is part of the logit: softmax(S + log c) gives
    // key j the weight c_j * exp(s_j) / sum_i c_i * exp(s_i), i.e. a mean
    // standing for c_j tokens counts c_j times (Eq. 13-15; docs/method.md,
    // "Scaling-aware attention"). Adding it after the max could overflow
    // exp() for large counts; adding it to P or to V would be wrong.
    // -inf + finite bias stays -inf, so masking before the bias is fine.
    const acc_t mx = bias_row ? add_bias_max(s, bias_row, cols) : row_max(s, cols);
    // Step 4: new running max m_new = max(m_old, block max).
    const acc_t m_old = mrow[r];
    const acc_t m_new = std::max(m_old, mx);
    if (m_new == neg_inf) {  // nothing visible yet in this row: P = 0, state unchanged
      std::fill(s, s + cols, acc_t(0));
      continue;
    }
    any = true;
    // Step 5: P = exp(t - m_new) in place in S (every value <= 1, no
    // overflow) and its row sum; masked entries give exp(-inf) = 0.
    const acc_t sum = exp_sum(s, m_new, cols);
    // Step 6: rescale what was accumulated under the old max,
    // alpha = exp(m_old - m_new) <= 1, applied to the running sum and to
    // the accumulator row. Skipped when the max did not move (alpha = 1)
    // and when nothing was accumulated yet (m_old = -inf: l = 0, acc = 0;
    // exp(-inf - m_new) would be 0 anyway, but -inf - -inf is NaN).
    if (m_old != m_new && m_old != neg_inf) {
      const acc_t alpha = std::exp(m_old - m_new);
      lrow[r] *= alpha;
      scale_row(acc + r * d, alpha, d);
    }
    // Step 7: running sum l += sum_j P_j, and remember the new max.
    lrow[r] += sum;
    mrow[r] = m_new;
  }
  // Step 8: accumulator acc += P V for all rows of the block at once
  // (one GEMM; rows that saw nothing have P = 0). Skipped when no row of
  // the block has a visible key.
  if (any) gemm_acc_pv<acc_t>(rows, cols, d, S, cols, Vp, ldv, acc, d);
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
