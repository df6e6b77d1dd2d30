// Shared helpers of the prism CPU kernels: BLAS access, vector helpers.
//
// Every .cpp in csrc/ is compiled three times (setup.py): once per CPU
// capability, with CPU_CAPABILITY_{DEFAULT,AVX2,AVX512} defined so that
// at::vec::Vectorized picks the matching specialisation. Only one variant is
// ever loaded into a process (prism_kernels/_cpp.py), so the variants never
// meet at link time.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>

// BLAS: torch's CPU library exports the Fortran sgemm_/dgemm_ of the BLAS it
// was built with (MKL on x86 wheels, OpenBLAS elsewhere). at::native::cpublas
// is not exported from libtorch_cpu, so we call BLAS directly. The symbols are
// declared weak: on a torch build without BLAS they resolve to null and the
// portable loops below take over (correct, slower).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace prism {

inline bool have_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// Row-major helpers on top of column-major BLAS.
//
// S[r][c] = alpha * sum_t A[r][t] * Bm[c][t]      (A: rows x k, ld lda; Bm: cols x k, ld ldb)
// S row-major with leading dimension lds.
template <typename T>
inline void gemm_abt(int64_t rows, int64_t cols, int64_t k, T alpha, const T* A, int64_t lda,
                     const T* Bm, int64_t ldb, T* S, int64_t lds) {
  // Column-major view: S^T (cols x rows) = Bm (cols x k) * A^T (k x rows).
  const int m_ = (int)cols, n_ = (int)rows, k_ = (int)k, lda_ = (int)ldb, ldb_ = (int)lda,
            ldc_ = (int)lds;
  const T beta = T(0);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) {
      sgemm_("T", "N", &m_, &n_, &k_, &alpha, Bm, &lda_, A, &ldb_, &beta, S, &ldc_);
      return;
    }
  } else {
    if (dgemm_) {
      dgemm_("T", "N", &m_, &n_, &k_, &alpha, Bm, &lda_, A, &ldb_, &beta, S, &ldc_);
      return;
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      T acc = 0;
      for (int64_t t = 0; t < k; ++t) acc += A[r * lda + t] * Bm[c * ldb + t];
      S[r * lds + c] = alpha * acc;
    }
}

// C[r][t] += sum_c P[r][c] * V[c][t]   (P: rows x cols, ld ldp; V: cols x d, ld ldv; C ld ldc)
template <typename T>
inline void gemm_acc_pv(int64_t rows, int64_t cols, int64_t d, const T* P, int64_t ldp,
                        const T* V, int64_t ldv, T* C, int64_t ldc) {
  // Column-major view: C^T (d x rows) += V^T (d x cols) * P^T (cols x rows).
  const int m_ = (int)d, n_ = (int)rows, k_ = (int)cols, lda_ = (int)ldv, ldb_ = (int)ldp,
            ldc_ = (int)ldc;
  const T one = T(1);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) {
      sgemm_("N", "N", &m_, &n_, &k_, &one, V, &lda_, P, &ldb_, &one, C, &ldc_);
      return;
    }
  } else {
    if (dgemm_) {
      dgemm_("N", "N", &m_, &n_, &k_, &one, V, &lda_, P, &ldb_, &one, C, &ldc_);
      return;
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const T p = P[r * ldp + c];
      if (p == T(0)) continue;
      for (int64_t t = 0; t < d; ++t) C[r * ldc + t] += p * V[c * ldv + t];
    }
}

// Uninitialised scratch buffer (per parallel chunk).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  explicit Scratch(int64_t n) : p(n > 0 ? new T[n] : nullptr) {}
  T* get() { return p.get(); }
};

// dst[j] = float(src[j]) for bf16 / fp16, vectorised.
template <typename scalar_t>
inline void widen(const scalar_t* src, float* dst, int64_t n) {
  using Vr = at::vec::Vectorized<scalar_t>;
  using Vf = at::vec::Vectorized<float>;
  int64_t j = 0;
  for (; j + Vr::size() <= n; j += Vr::size()) {
    auto [a, b] = at::vec::convert_to_float<scalar_t>(Vr::loadu(src + j));
    a.store(dst + j);
    b.store(dst + j + Vf::size());
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// acc[j] += float(src[j]) for bf16 / fp16, vectorised.
template <typename scalar_t>
inline void add_widened(float* acc, const scalar_t* src, int64_t n) {
  using Vr = at::vec::Vectorized<scalar_t>;
  using Vf = at::vec::Vectorized<float>;
  int64_t j = 0;
  for (; j + Vr::size() <= n; j += Vr::size()) {
    auto [a, b] = at::vec::convert_to_float<scalar_t>(Vr::loadu(src + j));
    (Vf::loadu(acc + j) + a).store(acc + j);
    (Vf::loadu(acc + j + Vf::size()) + b).store(acc + j + Vf::size());
  }
  for (; j < n; ++j) acc[j] += static_cast<float>(src[j]);
}

struct Blocks {
  int64_t q_block, k_block;
};
// Query / key block sizes of the attention kernel for these lengths.
Blocks choose_blocks(int64_t Nq, int64_t Nk, bool causal);

const char* capability();  // "DEFAULT", "AVX2" or "AVX512": what this variant was compiled for

}  // namespace prism
