// prism::segment_means on CPU, the "cpp" backend (docs/method.md, "Segment means"; Alg. 2).
//
// x [..., n, D] with any strides -> means [..., m, D] (x's dtype, contiguous)
// and counts int64 [m] (tensor_split sizes: the first n % m segments are one
// longer). One pass over x: every element is read once and summed into an
// fp32 (fp64 for fp64) accumulator row. Work is split into tasks
// (leading index, segment, column chunk) under at::parallel_for; column chunks
// keep both cores busy when there are few segments (m = 1).
#include "common.h"

#include <vector>

namespace prism {
namespace {

using at::vec::Vectorized;

template <typename T>
inline void add_row(T* acc, const T* x, int64_t n) {
  using V = Vectorized<T>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(acc + j) + V::loadu(x + j)).store(acc + j);
  for (; j < n; ++j) acc[j] += x[j];
}

// Rows summed into a partial accumulator before it is added to the total:
// keeps the fp32 rounding error of long segments near sqrt(n) * eps.
constexpr int64_t kPartialRows = 64;

template <typename scalar_t, typename acc_t>
void segment_means_kernel(const at::Tensor& x, int64_t m, at::Tensor& out) {
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t nd = x.dim();
  const int64_t n = x.size(nd - 2), D = x.size(nd - 1);
  const int64_t sn = x.stride(nd - 2), sd = x.stride(nd - 1);
  std::vector<int64_t> lead_sizes(x.sizes().begin(), x.sizes().end() - 2);
  std::vector<int64_t> lead_strides(x.strides().begin(), x.strides().end() - 2);
  int64_t L = 1;
  for (int64_t s : lead_sizes) L *= s;
  const int64_t base = n / m, rem = n % m;

  // Column chunks: split D only when there are too few (row, segment) tasks.
  const int64_t threads = at::get_num_threads();
  int64_t chunk = D;
  if (L * m < 4 * threads && D >= 128) {
    const int64_t want = (4 * threads + L * m - 1) / (L * m);
    chunk = std::max<int64_t>(64, ((D + want - 1) / want + 15) / 16 * 16);
  }
  const int64_t nC = (D + chunk - 1) / chunk;
  const int64_t tasks = L * m * nC;
  const int64_t work_per_task = std::max<int64_t>(1, (n / m) * chunk);
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_task);

  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  scalar_t* od = out.data_ptr<scalar_t>();

  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> tot_buf(chunk), part_buf(chunk);
    acc_t* tot = tot_buf.get();
    acc_t* part = part_buf.get();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t % nC;
      const int64_t seg = (t / nC) % m;
      const int64_t l = t / (nC * m);
      // Offset of leading index l (row-major over the leading dims).
      int64_t off = 0;
      for (int64_t i = (int64_t)lead_sizes.size() - 1, rest = l; i >= 0; --i) {
        off += (rest % lead_sizes[i]) * lead_strides[i];
        rest /= lead_sizes[i];
      }
      const int64_t r0 = seg * base + std::min(seg, rem);
      const int64_t len = base + (seg < rem ? 1 : 0);
      const int64_t c0 = c * chunk;
      const int64_t w = std::min(chunk, D - c0);
      const scalar_t* src = xd + off + r0 * sn + c0 * sd;

      std::fill(tot, tot + w, acc_t(0));
      for (int64_t p0 = 0; p0 < len; p0 += kPartialRows) {
        const int64_t p1 = std::min(len, p0 + kPartialRows);
        acc_t* dst = (p0 == 0) ? tot : part;
        if (p0 != 0) std::fill(part, part + w, acc_t(0));
        for (int64_t r = p0; r < p1; ++r) {
          const scalar_t* xr = src + r * sn;
          if (sd == 1) {
            if constexpr (kReduced) {
              add_widened(dst, xr, w);
            } else {
              add_row(dst, xr, w);
            }
          } else {
            for (int64_t j = 0; j < w; ++j) dst[j] += static_cast<acc_t>(xr[j * sd]);
          }
        }
        if (p0 != 0) add_row(tot, part, w);
      }
      // Division (not multiplication by 1/len) matches torch's mean rounding.
      for (int64_t j = 0; j < w; ++j) tot[j] = tot[j] / acc_t(len);
      at::vec::convert(tot, od + (l * m + seg) * D + c0, w);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> segment_means_cpu(const at::Tensor& x, int64_t num_segments) {
  TORCH_CHECK(x.dim() >= 2, "prism::segment_means: x must have shape [..., n, D] (at least 2-D), got ",
              x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "prism::segment_means: x must be float32, float64, bfloat16 or float16, got ", dtype);
  const int64_t n = x.size(-2);
  TORCH_CHECK(num_segments >= 1 && num_segments <= n,
              "prism::segment_means: num_segments must satisfy 1 <= num_segments <= n "
              "(n = x.shape[-2] = ", n, "), got ", num_segments);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[shape.size() - 2] = num_segments;
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor counts = at::empty({num_segments}, x.options().dtype(at::kLong));
  int64_t* cd = counts.data_ptr<int64_t>();
  for (int64_t s = 0; s < num_segments; ++s)
    cd[s] = n / num_segments + (s < n % num_segments ? 1 : 0);
  if (out.numel() == 0) return {out, counts};

  switch (dtype) {
    case at::kFloat: segment_means_kernel<float, float>(x, num_segments, out); break;
    case at::kDouble: segment_means_kernel<double, double>(x, num_segments, out); break;
    case at::kBFloat16: segment_means_kernel<at::BFloat16, float>(x, num_segments, out); break;
    case at::kHalf: segment_means_kernel<at::Half, float>(x, num_segments, out); break;
    default: TORCH_CHECK(false, "unreachable");
  }
  return {out, counts};
}

}  // namespace prism
