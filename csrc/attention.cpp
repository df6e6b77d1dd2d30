// prism::attention on CPU: scaling-aware attention, flash-style.
//
//   out = softmax(q k^T * scale + log_counts [+ causal -inf]) v,   lse = logsumexp(...)
//
// One task per (batch, head, query block) under at::parallel_for. Each task
// walks the key blocks with an online softmax (running max m, running sum l,
// unnormalised accumulator acc), so the extra memory is one score tile and one
// accumulator per thread: O(q_block * (k_block + d)), never Nq x Nk.
//  * The log-count bias is a [B, Nk] vector read once per key block and added
//    to the score tile; no bias matrix, no mask matrix, no duplicated rows.
//  * Causal (Eq. 17): key j is visible to query i iff k_pos[j] <= q_pos[i].
//    Positions are arbitrary (means sit after the local rows), so per key block
//    we precompute min/max k_pos: a block with min k_pos > max q_pos of the
//    query block is skipped whole, a block with max k_pos <= min q_pos needs no
//    mask, only the remaining (diagonal) blocks are masked element-wise.
//  * GEMMs (scores and P.V) go to BLAS (sgemm_/dgemm_) on strided rows, so the
//    transposed views Hugging Face passes (stride(-1) == 1, any row stride) are
//    read in place. bf16/fp16 tiles are widened to fp32 in per-thread buffers.
//  * Softmax arithmetic is vectorised with at::vec at this variant's ISA.
#include "common.h"

#include <algorithm>
#include <cstdlib>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace prism {
namespace {

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX512)
// PRISM_ATTN_SMALL=0 turns the small-problem path off (A/B timing, tests).
bool small_path_enabled() {
  static const bool on = [] { const char* e = std::getenv("PRISM_ATTN_SMALL"); return !(e && e[0] == '0'); }();
  return on;
}
#endif

// Rows are handed to BLAS with the row stride as leading dimension, which must
// be >= d: read in place when stride(-1) == 1 and rows do not overlap (any
// batch / head / row strides, e.g. transposed views); otherwise copy.
at::Tensor rows_readable(const at::Tensor& t) {
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


#if defined(CPU_CAPABILITY_AVX512)
// ---------------------------------------------------------------------------
// Small-problem path (fp32, d = 64, Nk <= kSmallMaxNk, AVX512): the paper's
// shapes (Nq ~ 100-128, Nk ~ 110-200). There MKL's sgemm runs at 100-130 GF/s
// and each call re-packs its operands; here the whole key set of a head is
// one block, so the task does
//   KT = K^T (d x Nk, zero-padded to a multiple of 16, L1-resident),
//   S  = scale * Q KT (+ bias, causal -inf) with an 8x32 register-tile kernel,
//   one softmax pass per row (max, exp, sum: no online rescaling),
//   O  = P V / l with a 6x64 register-tile kernel, written straight to out.
constexpr int64_t kSmallMaxNk = 512;
constexpr int64_t kSmallD = 64;

// S[r][c0 .. c0 + 16*NC) = sum_t Q[r][t] * KT[t][c], r < R.
template <int R, int NC>
inline void qk_tile(const float* Q, int64_t ldq, const float* KT, int64_t ldkt, float* S,
                    int64_t lds, float scale) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < kSmallD; ++t) {
    __m512 kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = _mm512_loadu_ps(KT + t * ldkt + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 qv = _mm512_set1_ps(Q[r * ldq + t]);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(S + r * lds + 16 * c, _mm512_mul_ps(acc[r][c], vs));
}

// Causal skipping: tmin[c / 16] is the smallest key position of 16-column
// tile c; a tile whose tmin > qmax (largest query position of these rows) is
// all future for every row, so it is not computed (the element-wise mask that
// follows writes -inf there) and its P is exactly 0 (skipped in P V).
inline bool tile_future(const int64_t* tmin, int64_t c, int64_t qmax) {
  return tmin != nullptr && tmin[c / 16] > qmax;
}

template <int R>
inline void qk_rows(const float* Q, int64_t ldq, const float* KT, int64_t ldkt, int64_t cols_pad,
                    float* S, int64_t lds, float scale, const int64_t* tmin, int64_t qmax) {
  int64_t c = 0;
  for (; c + 32 <= cols_pad; c += 32) {
    const bool f0 = tile_future(tmin, c, qmax), f1 = tile_future(tmin, c + 16, qmax);
    if (f0 && f1) continue;
    if (f0 || f1) {
      const int64_t cc = f0 ? c + 16 : c;
      qk_tile<R, 1>(Q, ldq, KT + cc, ldkt, S + cc, lds, scale);
    } else {
      qk_tile<R, 2>(Q, ldq, KT + c, ldkt, S + c, lds, scale);
    }
  }
  if (c < cols_pad && !tile_future(tmin, c, qmax)) qk_tile<R, 1>(Q, ldq, KT + c, ldkt, S + c, lds, scale);
}

// O[r][0..64) = inv[r] * sum_c P[r][c] * V[c][0..64), r < R.
template <int R>
inline void pv_rows(const float* P, int64_t ldp, const float* V, int64_t ldv, int64_t cols,
                    const float* inv, float* O, const int64_t* tmin, int64_t qmax) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < cols; j0 += 16) {
    if (tile_future(tmin, j0, qmax)) continue;
    const int64_t j1 = std::min(cols, j0 + 16);
    for (int64_t j = j0; j < j1; ++j) {
      __m512 vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = _mm512_loadu_ps(V + j * ldv + 16 * c);
      for (int r = 0; r < R; ++r) {
        const __m512 p = _mm512_set1_ps(P[r * ldp + j]);
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(p, vv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 s = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(O + r * kSmallD + 16 * c, _mm512_mul_ps(acc[r][c], s));
  }
}

// Largest query position of rows [r, r + n) (0 when not causal).
inline int64_t rows_qmax(const int64_t* qp, int64_t r, int64_t n) {
  if (qp == nullptr) return 0;
  int64_t m = qp[r];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, qp[r + i]);
  return m;
}

inline void qk_dispatch(int64_t rows, const float* Q, int64_t ldq, const float* KT, int64_t ldkt,
                        int64_t cols_pad, float* S, int64_t lds, float scale, const int64_t* tmin,
                        const int64_t* qp) {
  int64_t r = 0;
#define PRISM_QK(R) qk_rows<R>(Q + r * ldq, ldq, KT, ldkt, cols_pad, S + r * lds, lds, scale, tmin, rows_qmax(qp, r, R))
  for (; r + 8 <= rows; r += 8) PRISM_QK(8);
  switch (rows - r) {
    case 0: break;
    case 1: PRISM_QK(1); break;
    case 2: PRISM_QK(2); break;
    case 3: PRISM_QK(3); break;
    case 4: PRISM_QK(4); break;
    case 5: PRISM_QK(5); break;
    case 6: PRISM_QK(6); break;
    default: PRISM_QK(7); break;
  }
#undef PRISM_QK
}

inline void pv_dispatch(int64_t rows, const float* P, int64_t ldp, const float* V, int64_t ldv,
                        int64_t cols, const float* inv, float* O, const int64_t* tmin,
                        const int64_t* qp) {
  int64_t r = 0;
#define PRISM_PV(R) pv_rows<R>(P + r * ldp, ldp, V, ldv, cols, inv + r, O + r * kSmallD, tmin, rows_qmax(qp, r, R))
  for (; r + 6 <= rows; r += 6) PRISM_PV(6);
  switch (rows - r) {
    case 0: break;
    case 1: PRISM_PV(1); break;
    case 2: PRISM_PV(2); break;
    case 3: PRISM_PV(3); break;
    case 4: PRISM_PV(4); break;
    default: PRISM_PV(5); break;
  }
#undef PRISM_PV
}

// One causal score row, 16-key tiles: a tile all in the future of query
// position qi (tmin > qi) is set to 0 without exp; a tile with tmax > qi is
// masked element-wise; the rest only get the bias. Turns s into the
// unnormalised probabilities, writes the lse and returns the row sum
// (0 when no key is visible: zeros, lse = -inf).
inline float causal_row_softmax(float* s, const float* bias, const int64_t* kp,
                                const int64_t* tmin, const int64_t* tmax, int64_t Nk, int64_t qi,
                                float* lse_out) {
  using V = Vectorized<float>;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  V vmx(neg_inf);
  for (int64_t c = 0; c < Nk; c += 16) {
    if (tmin[c / 16] > qi) continue;
    const int64_t n = std::min<int64_t>(16, Nk - c);
    if (tmax[c / 16] > qi)
      for (int64_t j = c; j < c + n; ++j) s[j] = kp[j] > qi ? neg_inf : s[j];
    V x = V::loadu(s + c, n);
    if (bias) x = x + V::loadu(bias + c, n);
    if (n < 16) x = V::set(V(neg_inf), x, n);
    x.store(s + c, n);
    vmx = at::vec::maximum(vmx, x);
  }
  const float mx = at::vec::vec_reduce_all<float>([](V& a, V& b) { return at::vec::maximum(a, b); }, vmx);
  if (mx == neg_inf) {
    std::fill(s, s + Nk, 0.f);
    *lse_out = neg_inf;
    return 0.f;
  }
  const V vm(mx);
  V vsum(0.f);
  for (int64_t c = 0; c < Nk; c += 16) {
    const int64_t n = std::min<int64_t>(16, Nk - c);
    if (tmin[c / 16] > qi) {
      V(0.f).store(s + c, n);
      continue;
    }
    V e = vexp(V::loadu(s + c, n) - vm);
    if (n < 16) e = V::set(V(0.f), e, n);
    e.store(s + c, n);
    vsum = vsum + e;
  }
  const float sum = at::vec::vec_reduce_all<float>([](V& a, V& b) { return a + b; }, vsum);
  *lse_out = mx + std::log(sum);
  return sum;
}

// Whole problem, fp32, d = 64, Nk <= kSmallMaxNk. One task per (batch, head,
// query block of up to 128 rows).
void attention_small_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor* bias, const at::Tensor* q_pos, const at::Tensor* k_pos,
                         float scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  const int64_t group = H / Hkv;
  const int64_t qB = std::min<int64_t>(Nq, 128);
  const int64_t nQB = (Nq + qB - 1) / qB;
  const int64_t cols_pad = (Nk + 15) / 16 * 16;
  const float* qd = q.const_data_ptr<float>();
  const float* kd = k.const_data_ptr<float>();
  const float* vd = v.const_data_ptr<float>();
  const int64_t qsB = q.stride(0), qsH = q.stride(1), qsN = row_ld(q);
  const int64_t ksB = k.stride(0), ksH = k.stride(1), ksN = row_ld(k);
  const int64_t vsB = v.stride(0), vsH = v.stride(1), vsN = row_ld(v);
  const float* bd = bias ? bias->const_data_ptr<float>() : nullptr;
  const int64_t bsB = bias ? bias->stride(0) : 0;
  const bool causal = q_pos != nullptr;
  const int64_t* qpd = causal ? q_pos->const_data_ptr<int64_t>() : nullptr;
  const int64_t* kpd = causal ? k_pos->const_data_ptr<int64_t>() : nullptr;
  const int64_t qpsB = causal ? q_pos->stride(0) : 0, kpsB = causal ? k_pos->stride(0) : 0;
  float* od = out.data_ptr<float>();
  float* ld = lse.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, B * H * nQB, 1, [&](int64_t begin, int64_t end) {
    Scratch<float> kt_buf(kSmallD * cols_pad), s_buf(qB * cols_pad), inv_buf(qB);
    float* KT = kt_buf.get();
    float* S = s_buf.get();
    float* inv = inv_buf.get();
    std::vector<int64_t> tmin_buf(causal ? cols_pad / 16 : 0);
    std::vector<int64_t> tmax_buf(causal ? cols_pad / 16 : 0);
    int64_t* tmin = tmin_buf.data();
    int64_t* tmax = tmax_buf.data();
    int64_t tmin_for = -1;  // batch whose tile minima are in tmin
    int64_t kt_for = -1;  // (b, hk) whose K^T is in KT
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nQB;
      const int64_t h = (task / nQB) % H;
      const int64_t b = task / (nQB * H);
      const int64_t hk = h / group;
      const int64_t i0 = qb * qB;
      const int64_t rows = std::min(qB, Nq - i0);
      if (kt_for != b * Hkv + hk) {
        const float* K = kd + b * ksB + hk * ksH;
        for (int64_t j = 0; j < Nk; ++j)
          for (int64_t t = 0; t < kSmallD; ++t) KT[t * cols_pad + j] = K[j * ksN + t];
        for (int64_t t = 0; t < kSmallD; ++t)
          std::fill(KT + t * cols_pad + Nk, KT + (t + 1) * cols_pad, 0.f);
        kt_for = b * Hkv + hk;
      }
      const int64_t* kp = causal ? kpd + b * kpsB : nullptr;
      const int64_t* qp = causal ? qpd + b * qpsB + i0 : nullptr;
      if (causal && tmin_for != b) {
        for (int64_t c = 0; c < Nk; c += 16) {
          int64_t m = kp[c];
          for (int64_t j = c + 1; j < std::min(Nk, c + 16); ++j) m = std::min(m, kp[j]);
          tmin[c / 16] = m;
          int64_t M = kp[c];
          for (int64_t j = c + 1; j < std::min(Nk, c + 16); ++j) M = std::max(M, kp[j]);
          tmax[c / 16] = M;
        }
        tmin_for = b;
      }
      const int64_t* tm = causal ? tmin : nullptr;
      const float* Q = qd + b * qsB + h * qsH + i0 * qsN;
      qk_dispatch(rows, Q, qsN, KT, cols_pad, cols_pad, S, cols_pad, scale, tm, qp);

      const float* bias_row = bd ? bd + b * bsB : nullptr;
      float* lo = ld + (b * H + h) * Nq + i0;
      for (int64_t r = 0; r < rows; ++r) {
        float* s = S + r * cols_pad;
        if (causal) {
          const float sum = causal_row_softmax(s, bias_row, kp, tmin, tmax, Nk, qp[r], lo + r);
          inv[r] = sum > 0.f ? 1.f / sum : 0.f;
          continue;
        }
        const float mx = bias_row ? add_bias_max(s, bias_row, Nk) : row_max(s, Nk);
        if (mx == neg_inf) {  // no visible key: zeros, lse = -inf
          std::fill(s, s + Nk, 0.f);
          inv[r] = 0.f;
          lo[r] = neg_inf;
          continue;
        }
        const float sum = exp_sum(s, mx, Nk);
        inv[r] = 1.f / sum;
        lo[r] = mx + std::log(sum);
      }
      const float* Vp = vd + b * vsB + hk * vsH;
      pv_dispatch(rows, S, cols_pad, Vp, vsN, Nk, inv, od + ((b * H + h) * Nq + i0) * kSmallD, tm, qp);
    }
  });
}
#endif  // CPU_CAPABILITY_AVX512
}  // namespace

Blocks choose_blocks(int64_t Nq, int64_t Nk, bool causal) {
  // Small query blocks keep enough (b, h, q-block) tasks for the threads and
  // the score tile in L1/L2; long key blocks make the GEMMs efficient.
  // PRISM_ATTN_QBLOCK / PRISM_ATTN_KBLOCK override them (tuning only).
  static const int64_t env_q = [] { const char* e = std::getenv("PRISM_ATTN_QBLOCK"); return e ? std::atoll(e) : 0; }();
  static const int64_t env_k = [] { const char* e = std::getenv("PRISM_ATTN_KBLOCK"); return e ? std::atoll(e) : 0; }();
  int64_t qb = Nq >= 768 ? 128 : 64;
  int64_t kb = Nk >= 512 ? 512 : Nk;
  if (causal) {
    // Finer key blocks let whole future blocks be skipped.
    kb = Nk >= 1024 ? 256 : 64;
  }
  if (env_q > 0) qb = env_q;
  if (env_k > 0) kb = env_k;
  return {std::max<int64_t>(1, std::min(qb, Nq)), std::max<int64_t>(1, std::min(kb, Nk))};
}

namespace {

template <typename scalar_t, typename acc_t>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor* bias, const at::Tensor* q_pos, const at::Tensor* k_pos,
                      acc_t scale, at::Tensor& out, at::Tensor& lse) {
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  const int64_t group = H / Hkv;
  const Blocks blk = choose_blocks(Nq, Nk, q_pos != nullptr);
  const int64_t qB = blk.q_block, kB = blk.k_block;
  const int64_t nQB = (Nq + qB - 1) / qB, nKB = (Nk + kB - 1) / kB;

  const scalar_t* qd = q.const_data_ptr<scalar_t>();
  const scalar_t* kd = k.const_data_ptr<scalar_t>();
  const scalar_t* vd = v.const_data_ptr<scalar_t>();
  const int64_t qsB = q.stride(0), qsH = q.stride(1), qsN = row_ld(q);
  const int64_t ksB = k.stride(0), ksH = k.stride(1), ksN = row_ld(k);
  const int64_t vsB = v.stride(0), vsH = v.stride(1), vsN = row_ld(v);

  const acc_t* bd = bias ? bias->const_data_ptr<acc_t>() : nullptr;
  const int64_t bsB = bias ? bias->stride(0) : 0;
  const bool causal = q_pos != nullptr;
  const int64_t* qpd = causal ? q_pos->const_data_ptr<int64_t>() : nullptr;
  const int64_t* kpd = causal ? k_pos->const_data_ptr<int64_t>() : nullptr;
  const int64_t qpsB = causal ? q_pos->stride(0) : 0, kpsB = causal ? k_pos->stride(0) : 0;

  // Per (batch, key block): min and max key position.
  std::vector<int64_t> kmin, kmax;
  if (causal) {
    kmin.resize(B * nKB);
    kmax.resize(B * nKB);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t kb = 0; kb < nKB; ++kb) {
        const int64_t* p = kpd + b * kpsB + kb * kB;
        const int64_t n = std::min(kB, Nk - kb * kB);
        int64_t lo = p[0], hi = p[0];
        for (int64_t j = 1; j < n; ++j) {
          lo = std::min(lo, p[j]);
          hi = std::max(hi, p[j]);
        }
        kmin[b * nKB + kb] = lo;
        kmax[b * nKB + kb] = hi;
      }
  }

  scalar_t* od = out.data_ptr<scalar_t>();
  acc_t* ld = lse.data_ptr<acc_t>();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, B * H * nQB, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s_buf(qB * kB), acc_buf(qB * d), m_buf(qB), l_buf(qB);
    Scratch<acc_t> qc_buf(kReduced ? qB * d : 0), kc_buf(kReduced ? kB * d : 0),
        vc_buf(kReduced ? kB * d : 0);
    acc_t* S = s_buf.get();
    acc_t* acc = acc_buf.get();
    acc_t* mrow = m_buf.get();
    acc_t* lrow = l_buf.get();

    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nQB;
      const int64_t h = (task / nQB) % H;
      const int64_t b = task / (nQB * H);
      const int64_t hk = h / group;
      const int64_t i0 = qb * qB;
      const int64_t rows = std::min(qB, Nq - i0);

      const scalar_t* qsrc = qd + b * qsB + h * qsH + i0 * qsN;
      const acc_t* Q;
      int64_t ldq;
      if constexpr (kReduced) {
        convert_rows(qsrc, qsN, qc_buf.get(), rows, d);
        Q = qc_buf.get();
        ldq = d;
      } else {
        Q = qsrc;
        ldq = qsN;
      }

      const int64_t* qp = causal ? qpd + b * qpsB + i0 : nullptr;
      int64_t qmax = 0, qmin = 0;
      if (causal) {
        qmax = qmin = qp[0];
        for (int64_t r = 1; r < rows; ++r) {
          qmax = std::max(qmax, qp[r]);
          qmin = std::min(qmin, qp[r]);
        }
      }

      std::fill(acc, acc + rows * d, acc_t(0));
      std::fill(mrow, mrow + rows, neg_inf);
      std::fill(lrow, lrow + rows, acc_t(0));

      for (int64_t kb = 0; kb < nKB; ++kb) {
        bool need_mask = false;
        if (causal) {
          if (kmin[b * nKB + kb] > qmax) continue;  // whole block in the future
          need_mask = kmax[b * nKB + kb] > qmin;
        }
        const int64_t j0 = kb * kB;
        const int64_t cols = std::min(kB, Nk - j0);
        const scalar_t* ksrc = kd + b * ksB + hk * ksH + j0 * ksN;
        const scalar_t* vsrc = vd + b * vsB + hk * vsH + j0 * vsN;
        const acc_t *K, *Vp;
        int64_t ldk, ldv;
        if constexpr (kReduced) {
          convert_rows(ksrc, ksN, kc_buf.get(), cols, d);
          convert_rows(vsrc, vsN, vc_buf.get(), cols, d);
          K = kc_buf.get();
          Vp = vc_buf.get();
          ldk = ldv = d;
        } else {
          K = ksrc;
          Vp = vsrc;
          ldk = ksN;
          ldv = vsN;
        }

        // S = scale * Q K^T   (rows x cols, ld cols)
        gemm_abt<acc_t>(rows, cols, d, scale, Q, ldq, K, ldk, S, cols);

        const acc_t* bias_row = bd ? bd + b * bsB + j0 : nullptr;
        const int64_t* kp = causal ? kpd + b * kpsB + j0 : nullptr;
        bool any = false;
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = S + r * cols;
          if (need_mask) {
            const int64_t qi = qp[r];
            for (int64_t j = 0; j < cols; ++j) s[j] = kp[j] > qi ? neg_inf : s[j];
          }
          // -inf + finite bias stays -inf, so masking before the bias is fine.
          const acc_t mx = bias_row ? add_bias_max(s, bias_row, cols) : row_max(s, cols);
          const acc_t m_old = mrow[r];
          const acc_t m_new = std::max(m_old, mx);
          if (m_new == neg_inf) {  // nothing visible yet in this row
            std::fill(s, s + cols, acc_t(0));
            continue;
          }
          any = true;
          const acc_t sum = exp_sum(s, m_new, cols);
          if (m_old != m_new && m_old != neg_inf) {
            const acc_t alpha = std::exp(m_old - m_new);
            lrow[r] *= alpha;
            scale_row(acc + r * d, alpha, d);
          }
          lrow[r] += sum;
          mrow[r] = m_new;
        }
        if (any) gemm_acc_pv<acc_t>(rows, cols, d, S, cols, Vp, ldv, acc, d);
      }

      // Normalise and write out; rows with no visible key get zeros, lse = -inf.
      scalar_t* o = od + ((b * H + h) * Nq + i0) * d;
      acc_t* lo = ld + (b * H + h) * Nq + i0;
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* a = acc + r * d;
        if (lrow[r] > acc_t(0)) {
          scale_row(a, acc_t(1) / lrow[r], d);
          lo[r] = mrow[r] + std::log(lrow[r]);
        } else {
          std::fill(a, a + d, acc_t(0));
          lo[r] = neg_inf;
        }
        at::vec::convert(a, o + r * d, d);
      }
    }
  });
}

// [B, N] vector: element stride 1 (batch stride may be 0 from an expand).
at::Tensor rows_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor r = t.scalar_type() == dtype ? t : t.to(dtype);
  return r.stride(1) == 1 ? r : r.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in,
                                                 const std::optional<at::Tensor>& log_counts,
                                                 const std::optional<at::Tensor>& q_pos,
                                                 const std::optional<at::Tensor>& k_pos,
                                                 double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "prism::attention: q, k and v must be 4-D [B, H, N, d], got q ", q_in.sizes(),
              ", k ", k_in.sizes(), ", v ", v_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type(),
              "prism::attention: q, k and v must share one dtype, got ", q_in.scalar_type(), ", ",
              k_in.scalar_type(), ", ", v_in.scalar_type());
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "prism::attention: q must be float32, float64, bfloat16 or float16, got ", dtype);
  const int64_t B = q_in.size(0), H = q_in.size(1), Nq = q_in.size(2), d = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Nk = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B,
              "prism::attention: q, k and v must share the batch size B (dim 0)");
  TORCH_CHECK(v_in.size(1) == Hkv && v_in.size(2) == Nk,
              "prism::attention: k and v must share [B, Hkv, Nk], got k ", k_in.sizes(), " and v ",
              v_in.sizes());
  TORCH_CHECK(k_in.size(3) == d && v_in.size(3) == d,
              "prism::attention: q, k and v must share the head dimension d (dim 3)");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0,
              "prism::attention: query heads H must be a multiple of key/value heads Hkv, got H=",
              H, ", Hkv=", Hkv);
  TORCH_CHECK(q_pos.has_value() == k_pos.has_value(),
              "prism::attention: q_pos and k_pos must be given together (causal) or both be None");
  TORCH_CHECK(std::isfinite(scale), "prism::attention: scale must be finite, got ", scale);

  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, H, Nq, d}, q_in.options());
  at::Tensor lse = at::empty({B, H, Nq}, q_in.options().dtype(acc_type));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  if (Nk == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }

  // stride(-1) == 1 is read in place (any other strides); otherwise copy.
  at::Tensor q = rows_readable(q_in), k = rows_readable(k_in), v = rows_readable(v_in);

  at::Tensor bias;
  if (log_counts.has_value()) {
    const auto& lc = *log_counts;
    TORCH_CHECK(lc.dim() == 2 && lc.size(0) == B && lc.size(1) == Nk,
                "prism::attention: log_counts must have shape [B, Nk] = [", B, ", ", Nk, "], got ",
                lc.sizes());
    TORCH_CHECK(at::isFloatingType(lc.scalar_type()),
                "prism::attention: log_counts must be a float tensor, got ", lc.scalar_type());
    bias = rows_contiguous(lc, acc_type);
  }
  at::Tensor qp, kp;
  if (q_pos.has_value()) {
    TORCH_CHECK(q_pos->dim() == 2 && q_pos->size(0) == B && q_pos->size(1) == Nq,
                "prism::attention: q_pos must have shape [B, Nq] = [", B, ", ", Nq, "], got ",
                q_pos->sizes());
    TORCH_CHECK(k_pos->dim() == 2 && k_pos->size(0) == B && k_pos->size(1) == Nk,
                "prism::attention: k_pos must have shape [B, Nk] = [", B, ", ", Nk, "], got ",
                k_pos->sizes());
    TORCH_CHECK(q_pos->scalar_type() == at::kLong && k_pos->scalar_type() == at::kLong,
                "prism::attention: q_pos and k_pos must be int64, got ", q_pos->scalar_type(),
                " and ", k_pos->scalar_type());
    qp = rows_contiguous(*q_pos, at::kLong);
    kp = rows_contiguous(*k_pos, at::kLong);
  }
  const at::Tensor* bptr = bias.defined() ? &bias : nullptr;
  const at::Tensor* qpp = qp.defined() ? &qp : nullptr;
  const at::Tensor* kpp = kp.defined() ? &kp : nullptr;

  switch (dtype) {
    case at::kFloat:
#if defined(CPU_CAPABILITY_AVX512)
      if (d == kSmallD && Nk <= kSmallMaxNk && small_path_enabled()) {
        attention_small_f32(q, k, v, bptr, qpp, kpp, (float)scale, out, lse);
        break;
      }
#endif
      attention_kernel<float, float>(q, k, v, bptr, qpp, kpp, (float)scale, out, lse);
      break;
    case at::kDouble:
      attention_kernel<double, double>(q, k, v, bptr, qpp, kpp, scale, out, lse);
      break;
    case at::kBFloat16:
      attention_kernel<at::BFloat16, float>(q, k, v, bptr, qpp, kpp, (float)scale, out, lse);
      break;
    case at::kHalf:
      attention_kernel<at::Half, float>(q, k, v, bptr, qpp, kpp, (float)scale, out, lse);
      break;
    default:
      TORCH_CHECK(false, "unreachable");
  }
  return {out, lse};
}

}  // namespace prism
