// x @ W.T for a few rows x and a bf16 weight W read in place, row-major (AVX-512 BF16 `vdpbf16ps`, or AVX2 FMAs
// on the widened values): the matrix-vector products of decoding.
//
// W (N, K) bf16 with contiguous rows (any row stride): each output is the dot product of one weight row with
// one activation row, so the weight needs no layout of its own and can stay a view of the memory-mapped
// checkpoint. Four weight rows and up to four activation rows are computed together (16 float32
// accumulators: independent chains, each weight load used R times), 32 inputs a step, then each accumulator
// is summed across its lanes. One activation row (batch-1 decoding) takes one weight row at a time instead, as
// llama.cpp's ggml_vec_dot_bf16 does: a thread then reads one memory stream, not four rows 8 KB apart, which
// streams a 7B's 13 GB 1.09x as fast on a 2-core Zen 5 (`python benchmarks/bench_cpu_kernels.py --schemes
// bf16-order --rows 1 --layers 32`). With more activation rows each weight load serves all of them, and four
// weight rows a step win.
//
// bytes read per call: N*K*2 + M*K*2 (x stays in L1); written: M*N*4 (float32 out) or M*N*2 (bf16 out).

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include "library.h"
#include "parallel.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>

namespace {

constexpr int64_t BLOCK = 4;  // weight rows computed together (one when there is one activation row)
constexpr int64_t ROWS_A_CHUNK = 64;  // weight rows a thread takes at a time

template <int B, int R, typename Out>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
void block_avx512(const uint16_t* w, int64_t ldw, int64_t n0, int64_t rows, const uint16_t* x, int64_t m, int64_t K,
                  Out* out, int64_t N) {
  constexpr int SPLIT = R <= 2 ? 2 : 1;  // accumulators per (row, row) pair: independent chains for vdpbf16ps
  __m512 acc[SPLIT][B][R];
  for (int s = 0; s < SPLIT; ++s)
    for (int i = 0; i < B; ++i)
      for (int r = 0; r < R; ++r) acc[s][i][r] = _mm512_setzero_ps();
  const uint16_t* wr[B];
  for (int i = 0; i < B; ++i) wr[i] = w + (n0 + std::min<int64_t>(i, rows - 1)) * ldw;  // (repeats: discarded)
  int64_t k = 0;
  for (; k + 32 * SPLIT <= K; k += 32 * SPLIT) {
    for (int s = 0; s < SPLIT; ++s) {
      __m512bh xs[R];
      for (int r = 0; r < R; ++r) xs[r] = (__m512bh)_mm512_loadu_si512(x + (m + r) * K + k + 32 * s);
      for (int i = 0; i < B; ++i) {
        const __m512bh wi = (__m512bh)_mm512_loadu_si512(wr[i] + k + 32 * s);
        for (int r = 0; r < R; ++r) acc[s][i][r] = _mm512_dpbf16_ps(acc[s][i][r], wi, xs[r]);
      }
    }
  }
  for (; k < K; k += 32) {  // the rest, 32 inputs (or fewer, masked) at a time
    const __mmask32 mask = K - k >= 32 ? ~0u : (1u << (K - k)) - 1u;
    __m512bh xs[R];
    for (int r = 0; r < R; ++r) xs[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (m + r) * K + k);
    for (int i = 0; i < B; ++i) {
      const __m512bh wi = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr[i] + k);
      for (int r = 0; r < R; ++r) acc[0][i][r] = _mm512_dpbf16_ps(acc[0][i][r], wi, xs[r]);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int r = 0; r < R; ++r) {
      __m512 sum = acc[0][i][r];
      for (int s = 1; s < SPLIT; ++s) sum = _mm512_add_ps(sum, acc[s][i][r]);
      out[(m + r) * N + n0 + i] = Out(_mm512_reduce_add_ps(sum));  // (bf16: rounded to nearest even, as .to())
    }
}

__attribute__((target("avx2,fma")))
inline __m256 widen(const uint16_t* p) {  // 8 bf16 → 8 float32: the bits shifted to the upper half
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

template <int R, typename Out>
__attribute__((target("avx2,fma")))
void block_avx2(const uint16_t* w, int64_t ldw, int64_t n0, int64_t rows, const uint16_t* x, int64_t m, int64_t K,
                Out* out, int64_t N) {
  __m256 acc[BLOCK][R];
  for (int i = 0; i < BLOCK; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xs[R];
    for (int r = 0; r < R; ++r) xs[r] = widen(x + (m + r) * K + k);
    for (int i = 0; i < BLOCK && i < rows; ++i) {
      const __m256 wi = widen(w + (n0 + i) * ldw + k);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm256_fmadd_ps(wi, xs[r], acc[i][r]);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int r = 0; r < R; ++r) {
      float lanes[8];
      _mm256_storeu_ps(lanes, acc[i][r]);
      float sum = 0.f;
      for (float v : lanes) sum += v;
      for (int64_t kk = k; kk < K; ++kk)  // the last K % 8 inputs
        sum += c10::detail::f32_from_bits(w[(n0 + i) * ldw + kk]) * c10::detail::f32_from_bits(x[(m + r) * K + kk]);
      out[(m + r) * N + n0 + i] = Out(sum);
    }
}

enum Isa : int64_t { AVX2 = 1, AVX512 = 2 };

template <typename Out>
void rows_linear(const uint16_t* xp, const uint16_t* wp, int64_t ldw, int64_t M, int64_t K, int64_t N, int64_t isa,
                 int64_t block, Out* o) {
  const int64_t blocks = (N + block - 1) / block;
  codellama::parallel_chunks(blocks, ROWS_A_CHUNK / block, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * block, rows = std::min<int64_t>(block, N - n0);
      if (block == 1) {
        block_avx512<1, 1>(wp, ldw, n0, rows, xp, 0, K, o, N);
        continue;
      }
      codellama::in_fours(M, [&](auto r, int64_t m) {
        constexpr int R = decltype(r)::value;
        if (isa == AVX512) block_avx512<BLOCK, R>(wp, ldw, n0, rows, xp, m, K, o, N);
        else block_avx2<R>(wp, ldw, n0, rows, xp, m, K, o, N);
      });
    }
  });
}

// rows_a_step: weight rows computed together, 1 or 4; 0 chooses (1 for one activation row on AVX-512, else 4).
// Every output's arithmetic is the same either way: the choice moves only the order memory is read in.
// out_dtype: float32 (the sums as they are; the default) or bf16 (each sum rounded as .to(torch.bfloat16) does).
at::Tensor bf16_rows_linear(const at::Tensor& x, const at::Tensor& w, int64_t isa, int64_t rows_a_step,
                            std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "x must be contiguous (M, K) bf16");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.stride(1) == 1, "w must be (N, K) bf16 with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldw = w.stride(0);
  TORCH_CHECK(w.size(1) == K, "x has ", K, " inputs, w ", w.size(1));
  TORCH_CHECK(isa == AVX2 || isa == AVX512, "isa must be 1 (AVX2) or 2 (AVX-512 BF16)");
  TORCH_CHECK(rows_a_step == 0 || rows_a_step == BLOCK || (rows_a_step == 1 && isa == AVX512 && M == 1),
              "rows_a_step must be 0 (chosen), ", BLOCK, ", or 1 (AVX-512 BF16 with one row of x)");
  const at::ScalarType dtype = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "out_dtype must be float32 or bfloat16, not ", dtype);
  at::Tensor out = at::empty({M, N}, x.options().dtype(dtype));
  if (M == 0 || N == 0) return out;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const int64_t block = rows_a_step ? rows_a_step : isa == AVX512 && M == 1 ? 1 : BLOCK;
  if (dtype == at::kFloat) rows_linear(xp, wp, ldw, M, K, N, isa, block, out.data_ptr<float>());
  else rows_linear(xp, wp, ldw, M, K, N, isa, block, out.data_ptr<at::BFloat16>());
  return out;
}

// Whether every value of a contiguous bf16 tensor is finite (no exponent of all ones), in one parallel pass.
bool bf16_all_finite(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "w must be a contiguous bf16 tensor");
  const uint16_t* p = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  std::atomic<bool> finite{true};
  at::parallel_for(0, w.numel(), 1 << 16, [&](int64_t a, int64_t b) {
    uint16_t worst = 0;
    for (int64_t i = a; i < b; ++i) worst = std::max<uint16_t>(worst, p[i] & 0x7F80);
    if (worst == 0x7F80) finite = false;
  });
  return finite.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(codellama_native, m) {
  codellama::cpu_op(m, "bf16_rows_linear(Tensor x, Tensor w, int isa, int rows_a_step=0, ScalarType? out_dtype=None) -> Tensor",
                    bf16_rows_linear);
  codellama::cpu_op(m, "bf16_all_finite(Tensor w) -> bool", bf16_all_finite);
}
