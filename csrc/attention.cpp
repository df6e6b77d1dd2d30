// prism::attention on CPU (the "cpp" backend): scaling-aware attention, flash-style,
// the general blocked kernel (docs/method.md, "Scaling-aware attention").
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
//  * fp32 inputs with d = 64 and Nk <= 512 go to the small-problem path of
//    attention_small.cpp (AVX512 builds) instead, and few queries over a long
//    key list (decode steps) to the split-K path of attention_decode.cpp;
//    everything else runs here.
#include "attention_helpers.h"

#include <vector>

namespace prism {

using namespace attn;

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

  const Operands<scalar_t, acc_t> op(q, k, v, bias, q_pos, k_pos);
  const bool causal = op.causal;

  // Per (batch, key block): min and max key position.
  std::vector<int64_t> kmin, kmax;
  if (causal) {
    kmin.resize(B * nKB);
    kmax.resize(B * nKB);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t kb = 0; kb < nKB; ++kb) {
        const int64_t* p = op.k_pos(b, kb * kB);
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

      const scalar_t* qsrc = op.q_row(b, h, i0);
      const acc_t* Q;
      int64_t ldq;
      if constexpr (kReduced) {
        convert_rows(qsrc, op.qsN, qc_buf.get(), rows, d);
        Q = qc_buf.get();
        ldq = d;
      } else {
        Q = qsrc;
        ldq = op.qsN;
      }

      const int64_t* qp = op.q_pos(b, i0);
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
        const KVRows<acc_t> kv = op.kv(b, hk, j0, cols, d, kc_buf.get(), vc_buf.get());

        // One block of the online softmax (attention_helpers.h: the invariant and its steps).
        const acc_t* bias_row = op.bias_row(b, j0);
        const int64_t* kp = op.k_pos(b, j0);
        online_softmax_block<acc_t>(rows, cols, d, scale, Q, ldq, kv.K, kv.ldk, kv.V, kv.ldv, bias_row, need_mask, qp, kp,
                                    S, mrow, lrow, acc);
      }

      // Step 9, final division: out = acc / l, lse = m + log l (natural log),
      // once per row after the last key block rather than per block. Rows with
      // no visible key (l = 0) get exact zeros and lse = -inf.
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
                                                 double scale, int64_t decode_chunk_size) {
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

  // Few queries over a long key list: the split-K decode path
  // (attention_decode.cpp). decode_chunk_size < 0: decide here (decode_chunk);
  // 0: never (the path below, for A/B timing); > 0: forced, with that chunk.
  const int64_t chunk = decode_chunk_size < 0
      ? decode_chunk(B, H, Hkv, Nq, Nk, at::get_num_threads()) : decode_chunk_size;
  if (attention_decode(q, k, v, bptr, qpp, kpp, scale, chunk, out, lse)) return {out, lse};

  switch (dtype) {
    case at::kFloat:
      if (attention_small_f32(q, k, v, bptr, qpp, kpp, (float)scale, out, lse)) break;
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