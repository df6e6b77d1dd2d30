// prism::matched_rows on CPU, the "cpp" backend (docs/method.md, "Rows matched at a
// query"): one partition's segments summarised at one query per KV head.
//
// q0 [B, Hkv, d], k / v [B, n, Hkv * d], seg_of int64 [B, n] in 0..m-1 ->
//   km, vm [B, m, Hkv * d] (k's dtype) and bias [B, m, Hkv] (fp32; fp64 for fp64):
//   z_t = scale q0.k_t,  w_t = softmax of z over the token's segment,
//   km_j = sum w_t k_t,  vm_j = sum w_t v_t,  bias_j = logsumexp_j(z) - scale q0.km_j.
//
// The runtime builds these rows in every layer from tensors that the projections
// have just written, so the cost is in memory passes and op launches, not
// arithmetic (~n * d * 3 FMAs per head). The composite in PyTorch takes ~20 ops and
// two weighted copies of k and v; here each (sequence, KV head) is one task that
// reads its keys and values once and writes only the m rows. Per task: pass 1,
// the scores and each segment's maximum; pass 2, exp(z - max) into the segment's
// sums of weights, keys and values. A segment with no token gives zero rows and
// bias -inf (what the composite gives).
#include "common.h"

#include <vector>

namespace prism {
namespace {

using at::vec::Vectorized;

// acc[j] += w * x[j]
template <typename T>
inline void axpy(T* acc, T w, const T* x, int64_t n) {
  using V = Vectorized<T>;
  const V wv(w);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(acc + j) + wv * V::loadu(x + j)).store(acc + j);
  for (; j < n; ++j) acc[j] += w * x[j];
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  V s(T(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) s = s + V::loadu(a + j) * V::loadu(b + j);
  T out = at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, s);
  for (; j < n; ++j) out += a[j] * b[j];
  return out;
}

// The row x (length d, dtype scalar_t) as acc_t: a pointer into x itself when the
// types agree, else widened into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* x, acc_t* buf, int64_t d) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
    widen<scalar_t>(x, buf, d);
    return buf;
  }
}

template <typename scalar_t, typename acc_t>
void matched_rows_kernel(const at::Tensor& q0, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& seg_of, int64_t m, double scale, at::Tensor& km,
                         at::Tensor& vm, at::Tensor& bias) {
  const int64_t B = k.size(0), n = k.size(1), Hkv = q0.size(1), d = q0.size(2);
  const int64_t F = Hkv * d;
  // strides (elements) of the row-major views the caller made contiguous in the last dim
  const int64_t skb = k.stride(0), skn = k.stride(1), svb = v.stride(0), svn = v.stride(1);
  const acc_t* qd = q0.const_data_ptr<acc_t>();
  const scalar_t* kd = k.const_data_ptr<scalar_t>();
  const scalar_t* vd = v.const_data_ptr<scalar_t>();
  const int64_t* sd = seg_of.const_data_ptr<int64_t>();
  scalar_t* kmd = km.data_ptr<scalar_t>();
  scalar_t* vmd = vm.data_ptr<scalar_t>();
  acc_t* bd = bias.data_ptr<acc_t>();
  const acc_t s = static_cast<acc_t>(scale);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(n), top(m), tot(m), ksum(m * d), vsum(m * d), kbuf(d), vbuf(d);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / Hkv, h = t % Hkv;
      const acc_t* q = qd + (b * Hkv + h) * d;
      const scalar_t* kb = kd + b * skb + h * d;
      const scalar_t* vb = vd + b * svb + h * d;
      const int64_t* seg = sd + b * n;
      std::fill(top.begin(), top.end(), ninf);
      for (int64_t i = 0; i < n; ++i) {
        z[i] = s * dot<acc_t>(q, as_acc<scalar_t, acc_t>(kb + i * skn, kbuf.data(), d), d);
        top[seg[i]] = std::max(top[seg[i]], z[i]);
      }
      std::fill(tot.begin(), tot.end(), acc_t(0));
      std::fill(ksum.begin(), ksum.end(), acc_t(0));
      std::fill(vsum.begin(), vsum.end(), acc_t(0));
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = seg[i];
        const acc_t e = std::exp(z[i] - top[j]);
        tot[j] += e;
        axpy<acc_t>(ksum.data() + j * d, e, as_acc<scalar_t, acc_t>(kb + i * skn, kbuf.data(), d), d);
        axpy<acc_t>(vsum.data() + j * d, e, as_acc<scalar_t, acc_t>(vb + i * svn, vbuf.data(), d), d);
      }
      for (int64_t j = 0; j < m; ++j) {
        acc_t* kj = ksum.data() + j * d;
        acc_t* vj = vsum.data() + j * d;
        const acc_t inv = tot[j] > 0 ? acc_t(1) / tot[j] : acc_t(0);   // empty segment: zero rows
        for (int64_t c = 0; c < d; ++c) {
          kj[c] *= inv;
          vj[c] *= inv;
        }
        // the bias from the row in acc_t, before it is rounded to k's dtype
        bd[(b * m + j) * Hkv + h] = tot[j] > 0 ? std::log(tot[j]) + top[j] - s * dot<acc_t>(q, kj, d) : ninf;
        scalar_t* ko = kmd + (b * m + j) * F + h * d;
        scalar_t* vo = vmd + (b * m + j) * F + h * d;
        for (int64_t c = 0; c < d; ++c) {
          ko[c] = static_cast<scalar_t>(kj[c]);
          vo[c] = static_cast<scalar_t>(vj[c]);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> matched_rows_cpu(const at::Tensor& q0, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& seg_of,
                                                                int64_t num_segments, double scale) {
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && q0.device().is_cpu() && seg_of.device().is_cpu(),
              "prism::matched_rows (cpp): CPU tensors expected");
  TORCH_CHECK(q0.dim() == 3 && k.dim() == 3 && v.dim() == 3 && seg_of.dim() == 2,
              "prism::matched_rows: q0 [B, Hkv, d], k / v [B, n, Hkv*d], seg_of [B, n] expected");
  const int64_t B = k.size(0), n = k.size(1), Hkv = q0.size(1), d = q0.size(2), m = num_segments;
  TORCH_CHECK(q0.size(0) == B && k.size(2) == Hkv * d && v.sizes() == k.sizes() && seg_of.size(0) == B &&
                  seg_of.size(1) == n,
              "prism::matched_rows: shapes do not agree");
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "prism::matched_rows: k and v dtypes differ");
  TORCH_CHECK(seg_of.scalar_type() == at::kLong, "prism::matched_rows: seg_of must be int64");
  TORCH_CHECK(m >= 1, "prism::matched_rows: num_segments must be >= 1");
  const auto st = k.scalar_type();
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(q0.scalar_type() == acc, "prism::matched_rows: q0 must be fp32 (fp64 for fp64 k)");
  // rows contiguous in their last dim; the token and sequence strides may be anything
  const at::Tensor kc = k.stride(2) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(2) == 1 ? v : v.contiguous();
  const at::Tensor qc = q0.contiguous(), sc = seg_of.contiguous();
  if (B * n > 0) {
    const auto mn = sc.min().item<int64_t>(), mx = sc.max().item<int64_t>();
    TORCH_CHECK(mn >= 0 && mx < m, "prism::matched_rows: seg_of must lie in 0..num_segments-1, got ", mn,
                "..", mx, " for num_segments=", m);
  }
  at::Tensor km = at::empty({B, m, Hkv * d}, k.options());
  at::Tensor vm = at::empty({B, m, Hkv * d}, k.options());
  at::Tensor bias = at::empty({B, m, Hkv}, k.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "prism_matched_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    matched_rows_kernel<scalar_t, acc_t>(qc, kc, vc, sc, m, scale, km, vm, bias);
  });
  return {km, vm, bias};
}

}  // namespace prism
