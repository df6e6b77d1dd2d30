// prism::attention on CPU, small-problem path: fp32, d = 64, Nk <= 512, AVX512.
//
// These are the paper's shapes (Nq ~ 100-128, Nk ~ 110-200). There MKL's
// sgemm runs at 100-130 GF/s and each call re-packs its operands; here the
// whole key set of a head is one block, so one task (batch, head, query block
// of up to 128 rows) does
//   KT = K^T (d x Nk, zero-padded to a multiple of 16, L1-resident),
//   S  = scale * Q KT (+ bias, causal -inf) with an 8x32 register-tile kernel,
//   one softmax pass per row (max, exp, sum: no online rescaling, since all
//   keys are in the one block),
//   O  = P V / l with a 6x64 register-tile kernel, written straight to out.
// On other builds (DEFAULT, AVX2) attention_small_f32 only returns false and
// the general kernel (attention.cpp) serves every shape.
#include "attention_helpers.h"

#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace prism {
namespace attn {

#if defined(CPU_CAPABILITY_AVX512)
namespace {

// PRISM_ATTN_SMALL=0 turns the small-problem path off (A/B timing, tests).
bool small_path_enabled() {
  static const bool on = [] { const char* e = std::getenv("PRISM_ATTN_SMALL"); return !(e && e[0] == '0'); }();
  return on;
}

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
void small_f32_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
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

}  // namespace

bool attention_small_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor* bias, const at::Tensor* q_pos, const at::Tensor* k_pos,
                         float scale, at::Tensor& out, at::Tensor& lse) {
  if (q.scalar_type() != at::kFloat || q.size(3) != kSmallD || k.size(2) > kSmallMaxNk ||
      !small_path_enabled())
    return false;
  small_f32_kernel(q, k, v, bias, q_pos, k_pos, scale, out, lse);
  return true;
}

#else  // not AVX512: the general kernel serves every shape

bool attention_small_f32(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor*,
                         const at::Tensor*, const at::Tensor*, float, at::Tensor&, at::Tensor&) {
  return false;
}

#endif  // CPU_CAPABILITY_AVX512

}  // namespace attn
}  // namespace prism
