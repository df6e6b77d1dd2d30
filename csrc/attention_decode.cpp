// prism::attention on CPU, decode path: few queries (Nq <= kDecodeMaxNq) over a
// long key list, split over the keys ("split-K", flash-decoding on the CPU).
//
// In a decode step B = 1, Nq = 1 and H is 9-12, so the general kernel's tasks
// (batch, head, query block) are 9-12 GEMVs over the whole key list: with T
// threads the last round leaves threads idle (9 tasks on 2 threads = 5 + 4),
// and each query head of a GQA group re-reads the same K/V rows. Here:
//  * one task per (batch, kv head, key chunk): the group * Nq query rows that
//    share that kv head are one small Q matrix, so every K/V row is read (and,
//    for bf16/fp16, widened) once per group, not once per query head;
//  * the keys are cut into chunks so that there are enough tasks for the
//    threads; each task runs the usual online softmax over its chunk and leaves
//    a partial (m, l, acc) = (running max, sum of exp, unnormalised P V);
//  * a second, tiny pass merges the partials of a row by log-sum-exp:
//      M = max_c m_c,  L = sum_c l_c exp(m_c - M),  out = sum_c acc_c exp(m_c - M) / L,
//    lse = M + log L. This is the same algebra the online softmax does between
//    key blocks, so out and lse are exact up to rounding (not approximated).
// The log-count bias, causal positions (k_pos <= q_pos), -inf lse on rows with
// no visible key and the dtype rules (fp32 accumulation for bf16/fp16, fp64 for
// fp64) are those of the general kernel (attention.cpp).
#include "attention_helpers.h"

#include <atomic>
#include <vector>

namespace prism {
namespace attn {

namespace {

constexpr int64_t kDecodeMaxNq = 16;      // more queries: the general kernel has enough tasks
constexpr int64_t kDecodeMinNk = 1024;    // shorter key lists: not worth a second pass
constexpr int64_t kDecodeMinChunk = 256;  // keys per task: amortises the per-task setup / merge
constexpr int64_t kDecodeBlock = 256;     // key block inside a chunk (score tile rows x 256)

std::atomic<bool> g_enabled{[] {
  // PRISM_ATTN_DECODE=0 turns the decode path off at start (A/B timing);
  // set_decode_enabled() flips it at run time (tests, benchmarks).
  const char* e = std::getenv("PRISM_ATTN_DECODE");
  return !(e && e[0] == '0');
}()};
std::atomic<int64_t> g_calls{0};

template <typename scalar_t, typename acc_t>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor* bias, const at::Tensor* q_pos, const at::Tensor* k_pos,
                   acc_t scale, int64_t chunk, at::Tensor& out, at::Tensor& lse) {
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  const int64_t group = H / Hkv;
  const int64_t R = group * Nq;  // query rows per task: row r = query head (r / Nq), query (r % Nq)
  const int64_t nC = (Nk + chunk - 1) / chunk;
  const int64_t kB = std::min(kDecodeBlock, chunk);

  const Operands<scalar_t, acc_t> op(q, k, v, bias, q_pos, k_pos);
  const bool causal = op.causal;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  // Partials, per (b, kv head, chunk, row): m, l and acc (d values). With one
  // chunk the task finalises in place and these are not used.
  const int64_t nTask = B * Hkv * nC;
  std::vector<acc_t> pm(nC > 1 ? nTask * R : 0), pl(nC > 1 ? nTask * R : 0),
      pacc(nC > 1 ? nTask * R * d : 0);

  scalar_t* od = out.data_ptr<scalar_t>();
  acc_t* ld = lse.data_ptr<acc_t>();

  at::parallel_for(0, nTask, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> q_buf(R * d), s_buf(R * kB), acc_buf(R * d), m_buf(R), l_buf(R);
    Scratch<acc_t> kc_buf(kReduced ? kB * d : 0), vc_buf(kReduced ? kB * d : 0);
    Scratch<int64_t> qp_buf(causal ? R : 0);
    acc_t* Q = q_buf.get();
    acc_t* S = s_buf.get();
    int64_t* qp = qp_buf.get();

    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % nC;
      const int64_t hk = (task / nC) % Hkv;
      const int64_t b = task / (nC * Hkv);
      // Gather the group's query rows into one contiguous R x d matrix (widened
      // to acc_t): R is tiny (<= group * 16), and one Q lets a single GEMM
      // score all of them against each K row.
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i = 0; i < Nq; ++i) {
          const scalar_t* row = op.q_row(b, hk * group + g, i);
          acc_t* dst = Q + (g * Nq + i) * d;
          if constexpr (kReduced) widen(row, dst, d);
          else std::copy(row, row + d, dst);
        }
      }
      int64_t qmin = 0, qmax = 0;
      if (causal) {
        const int64_t* p = op.q_pos(b, 0);
        qmin = qmax = p[0];
        for (int64_t i = 0; i < Nq; ++i) {
          qmin = std::min(qmin, p[i]);
          qmax = std::max(qmax, p[i]);
        }
        for (int64_t r = 0; r < R; ++r) qp[r] = p[r % Nq];
      }

      // This task's state lives in the partial buffers (several chunks) or in
      // per-thread scratch (one chunk: finalised below).
      acc_t* acc = nC > 1 ? pacc.data() + task * R * d : acc_buf.get();
      acc_t* mrow = nC > 1 ? pm.data() + task * R : m_buf.get();
      acc_t* lrow = nC > 1 ? pl.data() + task * R : l_buf.get();
      std::fill(acc, acc + R * d, acc_t(0));
      std::fill(mrow, mrow + R, neg_inf);
      std::fill(lrow, lrow + R, acc_t(0));

      const int64_t c0 = c * chunk, c1 = std::min(Nk, c0 + chunk);
      for (int64_t j0 = c0; j0 < c1; j0 += kB) {
        const int64_t cols = std::min(kB, c1 - j0);
        const int64_t* kp = op.k_pos(b, j0);
        bool need_mask = false;
        if (causal) {
          // Positions are unsorted (own rows, then means): skip a block that is
          // in the future of every query, mask only blocks that straddle.
          int64_t lo = kp[0], hi = kp[0];
          for (int64_t j = 1; j < cols; ++j) {
            lo = std::min(lo, kp[j]);
            hi = std::max(hi, kp[j]);
          }
          if (lo > qmax) continue;
          need_mask = hi > qmin;
        }
        const KVRows<acc_t> kv = op.kv(b, hk, j0, cols, d, kc_buf.get(), vc_buf.get());
        // One block of the online softmax (attention_helpers.h), on this chunk's rows.
        const acc_t* bias_row = op.bias_row(b, j0);
        online_softmax_block<acc_t>(R, cols, d, scale, Q, d, kv.K, kv.ldk, kv.V, kv.ldv, bias_row, need_mask, qp, kp, S,
                                    mrow, lrow, acc);
      }

      if (nC == 1) {  // the whole key list was this task's: finalise as attention.cpp does
        for (int64_t r = 0; r < R; ++r) {
          const int64_t h = hk * group + r / Nq, i = r % Nq;
          acc_t* a = acc + r * d;
          scalar_t* o = od + ((b * H + h) * Nq + i) * d;
          if (lrow[r] > acc_t(0)) {
            scale_row(a, acc_t(1) / lrow[r], d);
            ld[(b * H + h) * Nq + i] = mrow[r] + std::log(lrow[r]);
          } else {
            std::fill(a, a + d, acc_t(0));
            ld[(b * H + h) * Nq + i] = neg_inf;
          }
          at::vec::convert(a, o, d);
        }
      }
    }
  });
  if (nC == 1) return;

  // Merge the chunks of each (b, kv head, row) by log-sum-exp. Chunks whose
  // rows saw nothing (m = -inf, l = 0) get weight 0; a row that saw nothing in
  // any chunk (M = -inf) gets exact zeros and lse = -inf, as in attention.cpp.
  // A decode step's merge is a few thousand multiply-adds: run it on this
  // thread (a second parallel region costs more to start than it saves, and
  // on a busy machine it waits for a descheduled worker); only big batches
  // of rows are split over the threads.
  const int64_t merge_grain = std::max<int64_t>(1, (int64_t(1) << 16) / (nC * d));
  at::parallel_for(0, B * Hkv * R, merge_grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> o_buf(d);
    acc_t* o = o_buf.get();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t % R, bh = t / R;  // bh = b * Hkv + hk
      const int64_t b = bh / Hkv, hk = bh % Hkv;
      const int64_t h = hk * group + r / Nq, i = r % Nq;
      const int64_t base = bh * nC;  // task index of chunk 0
      acc_t M = neg_inf;
      for (int64_t c = 0; c < nC; ++c) M = std::max(M, pm[(base + c) * R + r]);
      scalar_t* dst = od + ((b * H + h) * Nq + i) * d;
      if (M == neg_inf) {
        std::fill(o, o + d, acc_t(0));
        at::vec::convert(o, dst, d);
        ld[(b * H + h) * Nq + i] = neg_inf;
        continue;
      }
      std::fill(o, o + d, acc_t(0));
      acc_t L = 0;
      for (int64_t c = 0; c < nC; ++c) {
        const acc_t mc = pm[(base + c) * R + r];
        if (mc == neg_inf) continue;  // exp(-inf - M) would be 0 anyway; skip the row
        const acc_t w = std::exp(mc - M);
        L += w * pl[(base + c) * R + r];
        const acc_t* a = pacc.data() + ((base + c) * R + r) * d;
        using V = Vectorized<acc_t>;
        const V vw(w);
        int64_t j = 0;
        for (; j + V::size() <= d; j += V::size())
          (V::loadu(o + j) + V::loadu(a + j) * vw).store(o + j);
        for (; j < d; ++j) o[j] += a[j] * w;
      }
      scale_row(o, acc_t(1) / L, d);
      ld[(b * H + h) * Nq + i] = M + std::log(L);
      at::vec::convert(o, dst, d);
    }
  });
}

}  // namespace

int64_t decode_chunk(int64_t B, int64_t H, int64_t Hkv, int64_t Nq, int64_t Nk, int64_t threads) {
  if (!g_enabled.load(std::memory_order_relaxed)) return 0;
  if (Nq > kDecodeMaxNq || Nk < kDecodeMinNk || Hkv <= 0) return 0;
  // Enough tasks that every thread gets about the same number of keys (aim for
  // ~4 tasks per thread so the last round is short), but no chunk shorter than
  // kDecodeMinChunk keys.
  // at::parallel_for hands each thread one contiguous range of tasks, so a
  // task count that is a multiple of the thread count also balances the last
  // round (9 tasks on 2 threads would be 5 + 4).
  const int64_t bh = B * Hkv;
  const int64_t max_chunks = std::max<int64_t>(1, Nk / kDecodeMinChunk);
  const int64_t want = std::min(max_chunks, std::max<int64_t>(1, (4 * threads + bh - 1) / bh));
  int64_t nC = want;
  for (int64_t n = want; n <= std::min(max_chunks, 2 * want); ++n)
    if ((bh * n) % std::max<int64_t>(1, threads) == 0) {
      nC = n;
      break;
    }
  (void)H;
  return (Nk + nC - 1) / nC;
}

bool attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor* bias, const at::Tensor* q_pos, const at::Tensor* k_pos,
                      double scale, int64_t chunk, at::Tensor& out, at::Tensor& lse) {
  if (chunk <= 0) return false;
  g_calls.fetch_add(1, std::memory_order_relaxed);
  switch (q.scalar_type()) {
    case at::kFloat:
      decode_kernel<float, float>(q, k, v, bias, q_pos, k_pos, (float)scale, chunk, out, lse);
      break;
    case at::kDouble:
      decode_kernel<double, double>(q, k, v, bias, q_pos, k_pos, scale, chunk, out, lse);
      break;
    case at::kBFloat16:
      decode_kernel<at::BFloat16, float>(q, k, v, bias, q_pos, k_pos, (float)scale, chunk, out, lse);
      break;
    case at::kHalf:
      decode_kernel<at::Half, float>(q, k, v, bias, q_pos, k_pos, (float)scale, chunk, out, lse);
      break;
    default:
      TORCH_CHECK(false, "unreachable");
  }
  return true;
}

bool set_decode_enabled(bool on) { return g_enabled.exchange(on); }
int64_t decode_calls() { return g_calls.load(std::memory_order_relaxed); }

}  // namespace attn
}  // namespace prism
