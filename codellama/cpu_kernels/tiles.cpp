// x @ W.T for int4 weights in 16-row tiles and int8 weights read in place, with the activations quantized to
// int8: the integer dot products of llama.cpp's Q4_0 and Q8_0 paths (AVX-512 VNNI `vpdpbusd`, or AVX2
// `vpmaddubsw` + `vpmaddwd`) on this library's codes. Each 64-byte chunk of a tile is one 512-bit register:
// lane i (an int32) of vpdpbusd sums row i's products with four activations.
//
// int4: W[n, k] = s[n, g] * (q[n, k] - 8) + z[n, g]   (codellama.quantize's int4: codes 0..15, a scale and a
// zero per group of G inputs). Its CPU layout ("tiles", made by codellama/cpu_kernels/int4.py's int4_tiles):
//   tiles (Nt, Gn, G/8, 64) uint8: tile t holds rows 16t..16t+15; for group g, chunk c, byte 4i+j holds
//     row 16t+i's code of input g*G + 4c + j (low nibble) and of input g*G + G/2 + 4c + j (high nibble),
//     the pairing of the checkpoint's own bytes, so making tiles moves whole bytes only;
//   sz (Nt, Gn, 2, 16) bf16 or fp32: the 16 rows' scales, then their zeros.
// The activations x (M, K) are quantized per half group (H = G/2 inputs): x ~ d * a, a int8 in [-127, 127],
// d = max|x| / 127. Then for one row and group:
//   sum_k W x = s * (d_lo * sum_lo (q - 8) a + d_hi * sum_hi (q - 8) a) + z * sum_k x
// where sum (q - 8) a = vpdpbusd(q, a) - 8 * sum a is exact in int32 and sum_k x is exact in float.
// bytes read per call: Nt*Gn*(G*8 + 2*16*size(sz)) + M*K*size(x); written: M*N*4 (float32 out).
//
// int8: W[n, k] = s[n] * q[n, k]   (codellama.quantize's int8: codes -128..127, a scale per row), read where
// the codes lie: w (N, K) int8 with contiguous rows (any row stride: a view of the checkpoint's file), s (N,).
// The activations are quantized per block of B = 32 inputs (as llama.cpp's Q8_0); per row and block
//   sum_k q a = vpdpbusd(q + 128, a) - 128 * sum a   (q + 128: the sign bit flipped as a chunk is read,
//   since vpdpbusd multiplies unsigned by signed bytes; AVX2: |q| times a with q's sign, no offset)
// exact in int32; the row's output is s * sum_blocks d * sum_k q a. Up to ROWS_MAX activation rows stream each
// weight row once (row8_*); more rows copy 16 weight rows at a time into a tile in cache (pack_tile8: byte
// 4i+j of chunk c is row i's code of input 4c+j) that the tile kernel (tile8_*) reads for every activation row.
// bytes read per call: N*K + M*K*size(x).
//
// Also here: codellama.quantize's int8 and int4 quantizers in one pass over a float weight (quantize_int8,
// quantize_int4), bit for bit the PyTorch arithmetic's codes, for quantizing while loading.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include "library.h"
#include "parallel.h"

#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t TILE = 16;  // output rows per tile: the int32 lanes of a 512-bit register
enum Isa : int64_t { AVX2 = 1, AVX512_VNNI = 2 };  // what the operators' isa argument names
// Codes are prefetched this many bytes ahead: a tile's loop has enough instructions per byte that the
// out-of-order window covers too little of the memory latency (an int4 layer of 49152 x 4096 at batch 1 read
// ~30 GB/s from memory without it and ~42 GB/s with it, medians of three runs of a build that took the
// distance from the environment, on a 2-core Zen 5; benchmarks/bench_cpu_kernels.py times the kernels).
constexpr int64_t PREFETCH = 4096;

// The activations of one call quantized per block of B inputs: a (M, Kp) int8 (zero past K); per (row, block):
// d and -offset * sum a (the int32 a dot product starts from: offset = 8 for int4's codes, 128 for int8's,
// 0 where the kernel multiplies signed codes); per (row, group of G inputs, when G > 0): sum x.
struct Quantized {
  int64_t Kp = 0, blocks = 0;
  std::vector<int8_t> a;
  std::vector<float> d;
  std::vector<int32_t> corr;
  std::vector<float> sumx;
};

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int64_t Kp, int64_t B, int32_t offset, int64_t G,
                   Quantized& q) {
  const int64_t blocks = Kp / B, groups = G > 0 ? Kp / G : 0;
  q.Kp = Kp;
  q.blocks = blocks;
  q.a.assign(M * Kp, 0);
  q.d.resize(M * blocks);
  q.corr.resize(M * blocks);
  q.sumx.assign(M * groups, 0.f);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(B);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * B, n = std::max<int64_t>(0, std::min<int64_t>(B, K - k0));
        const T* src = x + m * K + k0;
        float amax = 0.f, sum = 0.f;
        for (int64_t k = 0; k < n; ++k) {
          buf[k] = to_float(src[k]);
          amax = std::max(amax, std::abs(buf[k]));
          sum += buf[k];
        }
        const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int8_t* dst = q.a.data() + m * Kp + k0;
        int32_t suma = 0;
        for (int64_t k = 0; k < n; ++k) {
          const int32_t v = static_cast<int32_t>(std::nearbyint(buf[k] * inv));
          dst[k] = static_cast<int8_t>(v);
          suma += v;
        }
        q.d[m * blocks + b] = d;
        q.corr[m * blocks + b] = -offset * suma;
        if (groups) q.sumx[m * groups + k0 / G] += sum;
      }
    }
  });
}

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ----------------------------------------------------------------------------- AVX-512 VNNI
// 16 float32 or bf16 values (any 2-byte type: its bits) as float32; past the mask, 0.
template <typename S>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
inline __m512 load16_avx512(const S* p, __mmask16 mask = 0xFFFF) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_maskz_loadu_ps(mask, p);
  } else {  // bf16: the upper half of a float32
    const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// One tile (16 output rows) for R activation rows starting at row m.
template <int R, typename S>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
void tile_avx512(const uint8_t* tile, const S* sz, const Quantized& q, int64_t m, int64_t K, int64_t G,
                 float* out, int64_t N, int64_t n0) {
  const int64_t groups = K / G, halves = 2 * groups, chunks = G / 8, H = G / 2;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* codes = tile + g * chunks * 64;
    __m512i lo_dot[R], hi_dot[R];
    for (int r = 0; r < R; ++r) {
      lo_dot[r] = _mm512_set1_epi32(q.corr[(m + r) * halves + 2 * g]);
      hi_dot[r] = _mm512_set1_epi32(q.corr[(m + r) * halves + 2 * g + 1]);
    }
    for (int64_t c = 0; c < chunks; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(codes + c * 64 + PREFETCH), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(codes + c * 64);
      const __m512i lo = _mm512_and_si512(v, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int r = 0; r < R; ++r) {
        const int8_t* a = q.a.data() + (m + r) * q.Kp + g * G + 4 * c;
        lo_dot[r] = _mm512_dpbusd_epi32(lo_dot[r], lo, _mm512_set1_epi32(four_bytes(a)));
        hi_dot[r] = _mm512_dpbusd_epi32(hi_dot[r], hi, _mm512_set1_epi32(four_bytes(a + H)));
      }
    }
    const __m512 s = load16_avx512(sz + g * 2 * TILE), z = load16_avx512(sz + g * 2 * TILE + TILE);
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m + r) * halves + 2 * g;
      __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(lo_dot[r]), _mm512_set1_ps(q.d[i]));
      t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi_dot[r]), _mm512_set1_ps(q.d[i + 1]), t);
      acc[r] = _mm512_fmadd_ps(s, t, acc[r]);
      acc[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(q.sumx[(m + r) * groups + g]), acc[r]);
    }
  }
  const int64_t valid = std::min<int64_t>(TILE, N - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + (m + r) * N + n0, mask, acc[r]);
}

// ----------------------------------------------------------------------------- AVX2
// The same tiles: a 64-byte chunk is two 256-bit halves (rows 0-7, rows 8-15). Without VNNI, u8 x s8 products
// are summed in pairs to int16 (at most 2 * 15 * 127, no saturation), then in pairs to int32.
template <typename S>
__attribute__((target("avx2,fma")))
inline __m256 load8_avx2(const S* p) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <int R, typename S>
__attribute__((target("avx2,fma")))
void tile_avx2(const uint8_t* tile, const S* sz, const Quantized& q, int64_t m, int64_t K, int64_t G,
               float* out, int64_t N, int64_t n0) {
  const int64_t groups = K / G, halves = 2 * groups, chunks = G / 8, H = G / 2;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* codes = tile + g * chunks * 64;
    __m256i lo_dot[R][2], hi_dot[R][2];
    for (int r = 0; r < R; ++r) {
      lo_dot[r][0] = lo_dot[r][1] = _mm256_set1_epi32(q.corr[(m + r) * halves + 2 * g]);
      hi_dot[r][0] = hi_dot[r][1] = _mm256_set1_epi32(q.corr[(m + r) * halves + 2 * g + 1]);
    }
    for (int64_t c = 0; c < chunks; ++c) {
      for (int half = 0; half < 2; ++half) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c * 64 + half * 32));
        const __m256i lo = _mm256_and_si256(v, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          const int8_t* a = q.a.data() + (m + r) * q.Kp + g * G + 4 * c;
          const __m256i lo_p = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(four_bytes(a))), ones);
          const __m256i hi_p = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_set1_epi32(four_bytes(a + H))), ones);
          lo_dot[r][half] = _mm256_add_epi32(lo_dot[r][half], lo_p);
          hi_dot[r][half] = _mm256_add_epi32(hi_dot[r][half], hi_p);
        }
      }
    }
    for (int half = 0; half < 2; ++half) {
      const __m256 s = load8_avx2(sz + g * 2 * TILE + 8 * half), z = load8_avx2(sz + g * 2 * TILE + TILE + 8 * half);
      for (int r = 0; r < R; ++r) {
        const int64_t i = (m + r) * halves + 2 * g;
        __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(lo_dot[r][half]), _mm256_set1_ps(q.d[i]));
        t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi_dot[r][half]), _mm256_set1_ps(q.d[i + 1]), t);
        acc[r][half] = _mm256_fmadd_ps(s, t, acc[r][half]);
        acc[r][half] = _mm256_fmadd_ps(z, _mm256_set1_ps(q.sumx[(m + r) * groups + g]), acc[r][half]);
      }
    }
  }
  float buf[TILE];
  const int64_t valid = std::min<int64_t>(TILE, N - n0);
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(buf, acc[r][0]);
    _mm256_storeu_ps(buf + 8, acc[r][1]);
    std::memcpy(out + (m + r) * N + n0, buf, valid * sizeof(float));
  }
}

// ----------------------------------------------------------------------------- int8
constexpr int64_t BLOCK8 = 32;  // activations quantized per this many inputs (llama.cpp's Q8_0 block)

// One int8 tile (16 output rows, packed per call by pack_tile8 below) for R activation rows starting at row m:
// for each block, eight chunks of vpdpbusd ((codes + 128) times a) from -128 * sum a, then d times that, summed
// in float; the rows' scales last.
template <int R, typename S>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
void tile8_avx512(const uint8_t* tile, const S* sc, const Quantized& q, int64_t m, float* out, int64_t N,
                  int64_t n0) {
  constexpr int64_t chunks = BLOCK8 / 4;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < q.blocks; ++b) {
    const uint8_t* codes = tile + b * chunks * 64;
    __m512i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_set1_epi32(q.corr[(m + r) * q.blocks + b]);
    for (int64_t c = 0; c < chunks; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(codes + c * 64 + PREFETCH), _MM_HINT_T0);
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(codes + c * 64), flip);  // q + 128
      for (int r = 0; r < R; ++r) {
        const int8_t* a = q.a.data() + (m + r) * q.Kp + b * BLOCK8 + 4 * c;
        dot[r] = _mm512_dpbusd_epi32(dot[r], v, _mm512_set1_epi32(four_bytes(a)));
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(q.d[(m + r) * q.blocks + b]), acc[r]);
  }
  const __m512 s = load16_avx512(sc);
  const int64_t valid = std::min<int64_t>(TILE, N - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + (m + r) * N + n0, mask, _mm512_mul_ps(acc[r], s));
}

// AVX2: vpmaddubsw would saturate on (q + 128) * a, so it multiplies |q| by a carrying q's sign (vpsignb),
// which sums pairs to at most 2 * 128 * 127 in int16; the activations' offset is then 0.
template <int R, typename S>
__attribute__((target("avx2,fma")))
void tile8_avx2(const uint8_t* tile, const S* sc, const Quantized& q, int64_t m, float* out, int64_t N,
                int64_t n0) {
  constexpr int64_t chunks = BLOCK8 / 4;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < q.blocks; ++b) {
    const uint8_t* codes = tile + b * chunks * 64;
    __m256i dot[R][2];
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; ++c) {
      for (int half = 0; half < 2; ++half) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c * 64 + half * 32));  // q
        const __m256i magnitude = _mm256_abs_epi8(w);
        for (int r = 0; r < R; ++r) {
          const int8_t* a = q.a.data() + (m + r) * q.Kp + b * BLOCK8 + 4 * c;
          const __m256i signed_a = _mm256_sign_epi8(_mm256_set1_epi32(four_bytes(a)), w);
          dot[r][half] = _mm256_add_epi32(dot[r][half],
                                          _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_a), ones));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 d = _mm256_set1_ps(q.d[(m + r) * q.blocks + b]);
      for (int half = 0; half < 2; ++half)
        acc[r][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][half]), d, acc[r][half]);
    }
  }
  float buf[TILE];
  const int64_t valid = std::min<int64_t>(TILE, N - n0);
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(buf, _mm256_mul_ps(acc[r][0], load8_avx2(sc)));
    _mm256_storeu_ps(buf + 8, _mm256_mul_ps(acc[r][1], load8_avx2(sc + 8)));
    std::memcpy(out + (m + r) * N + n0, buf, valid * sizeof(float));
  }
}

// ----------------------------------------------------------------------------- int8, read in place
// A few activation rows (decoding) read the codes where they lie, row-major: the checkpoint's own layout, so a
// layer can stay a view of the memory-mapped file and loading makes no copy. One weight row at a time (a single
// stream from memory: two or four rows side by side read 20-25% slower here), for R activation rows. A 64-byte
// chunk of the row is one register; lane l of vpdpbusd sums its products with activations 4l..4l+3 of the
// chunk, so lanes 0-7 belong to one block of 32 and lanes 8-15 to the next. Each lane starts from -128 times
// its four activations' sum, which makes its int32 exact (sum q a), then is scaled by its block's d and summed
// in float; the lanes are added at the end, in an order that does not depend on R.
constexpr int64_t ROWS_MAX = 8;  // up to this many activation rows; more are computed on tiles packed per call
constexpr int64_t ROWS_A_CHUNK = 64;  // weight rows a thread takes at a time

template <typename S>
inline float scale_at(const S* p, int64_t i) {
  if constexpr (std::is_same_v<S, float>) return p[i];
  else return c10::detail::f32_from_bits(p[i]);
}

// Chunk c of a weight row for R activation rows (MASKED: the row's last chunk, code 0 past K).
template <int R, bool MASKED>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"), always_inline))
inline void row8_chunk(__m512 (&acc)[R], const int8_t* row, int64_t c, __mmask64 mask, const Quantized& q, int64_t m) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i raw = MASKED ? _mm512_maskz_loadu_epi8(mask, row + c * 64) : _mm512_loadu_si512(row + c * 64);
  const __m512i v = _mm512_xor_si512(raw, flip);  // q + 128
  for (int r = 0; r < R; ++r) {
    const __m512i a = _mm512_loadu_si512(q.a.data() + (m + r) * q.Kp + c * 64);
    const __m512i corr = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, a));  // -128 * sum a, per lane
    const double* d2 = reinterpret_cast<const double*>(q.d.data() + (m + r) * q.blocks + 2 * c);  // the two blocks' d
    const __m512 d = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(d2))));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, v, a)), d, acc[r]);
  }
}

template <int R, typename S>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
void row8_avx512(const int8_t* row, float scale, const Quantized& q, int64_t m, int64_t K, float* out, int64_t N) {
  const int64_t whole = K / 64;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < whole; ++c) {
    _mm_prefetch(reinterpret_cast<const char*>(row + c * 64 + PREFETCH), _MM_HINT_T0);
    row8_chunk<R, false>(acc, row, c, 0, q, m);
  }
  if (whole * 64 < K) row8_chunk<R, true>(acc, row, whole, (1ull << (K - whole * 64)) - 1ull, q, m);
  for (int r = 0; r < R; ++r) out[(m + r) * N] = _mm512_reduce_add_ps(acc[r]) * scale;
}

// AVX2: a block of 32 inputs is one register: |q| times a carrying q's sign, as tile8_avx2, then the block's
// eight int32 lanes scaled by its d and summed in float.
template <int R, typename S>
__attribute__((target("avx2,fma")))
void row8_avx2(const int8_t* row, float scale, const Quantized& q, int64_t m, int64_t K, float* out, int64_t N) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b * BLOCK8 < K; ++b) {
    __m256i v;
    if (K - b * BLOCK8 >= BLOCK8) {
      v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * BLOCK8));
    } else {  // the last, partial block: code 0 past K
      alignas(32) int8_t tail[BLOCK8] = {};
      std::memcpy(tail, row + b * BLOCK8, K - b * BLOCK8);
      v = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
    }
    const __m256i magnitude = _mm256_abs_epi8(v);
    for (int r = 0; r < R; ++r) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.a.data() + (m + r) * q.Kp + b * BLOCK8));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(a, v)), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(q.d[(m + r) * q.blocks + b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc[r]);
    float sum = 0.f;
    for (float v : lanes) sum += v;
    out[(m + r) * N] = sum * scale;
  }
}

// Rows 16t..16t+15 of a row-major int8 weight as a tile: byte 4i+j of chunk c is row i's code of input 4c+j
// (0 past K or N). Words are 4 bytes of a row; 16 rows x 16 words move as a 16x16 int32 transpose in registers
// (AVX-512), the rest one word at a time.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
void transpose16_avx512(const int8_t* const (&rows)[TILE], int64_t word, uint8_t* tile) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = rows[i] ? _mm512_loadu_si512(rows[i] + 4 * word) : _mm512_setzero_si512();
  for (int k = 0; k < 8; ++k) {  // per 128-bit lane: [a0 b0 a1 b1], [a2 b2 a3 b3]
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // u[4k + x], lane L: rows 4k..4k+3 of word 4L + x
    r[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    r[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int x = 0; x < 4; ++x) {  // word 4L + x: lane L of u[x], u[4 + x], u[8 + x], u[12 + x]
    const __m512i lo01 = _mm512_shuffle_i32x4(r[x], r[4 + x], 0x44), lo23 = _mm512_shuffle_i32x4(r[8 + x], r[12 + x], 0x44);
    const __m512i hi01 = _mm512_shuffle_i32x4(r[x], r[4 + x], 0xEE), hi23 = _mm512_shuffle_i32x4(r[8 + x], r[12 + x], 0xEE);
    _mm512_storeu_si512(tile + (word + x) * 64, _mm512_shuffle_i32x4(lo01, lo23, 0x88));
    _mm512_storeu_si512(tile + (word + 4 + x) * 64, _mm512_shuffle_i32x4(lo01, lo23, 0xDD));
    _mm512_storeu_si512(tile + (word + 8 + x) * 64, _mm512_shuffle_i32x4(hi01, hi23, 0x88));
    _mm512_storeu_si512(tile + (word + 12 + x) * 64, _mm512_shuffle_i32x4(hi01, hi23, 0xDD));
  }
}

void pack_tile8(const int8_t* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, int64_t t, bool avx512, uint8_t* tile) {
  const int8_t* rows[TILE];
  for (int64_t i = 0; i < TILE; ++i) rows[i] = t * TILE + i < N ? w + (t * TILE + i) * ldw : nullptr;
  int64_t word = 0;
  if (avx512)
    for (; (word + 16) * 4 <= K; word += 16) transpose16_avx512(rows, word, tile);
  for (int64_t i = 0; i < TILE; ++i)
    for (int64_t c = word; c < Kp / 4; ++c)
      for (int64_t j = 0; j < 4; ++j)
        tile[c * 64 + 4 * i + j] = rows[i] && 4 * c + j < K ? static_cast<uint8_t>(rows[i][4 * c + j]) : 0;
}

// ----------------------------------------------------------------------------- quantizing
// codellama.quantize's int8 of a float weight in one pass (its quantize_int8, bit for bit): per row, the scale
// max|w| / 127 rounded to the weight's dtype (as it is stored), the codes w / scale (divided by at least the
// smallest normal float) rounded half to even and clamped to [-127, 127]; a row of zeros gets scale 0, codes 0.
// One row, 16 values a step (the same arithmetic as the scalar loop below: exact max, IEEE division, rounding
// half to even).
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
float row_amax_avx512(const T* row, int64_t K) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1u);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(load16_avx512(row + k, mask)));
  }
  return _mm512_reduce_max_ps(amax);
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
void row_codes_avx512(const T* row, int64_t K, float div, int8_t* codes) {
  const __m512 d = _mm512_set1_ps(div), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 v = _mm512_div_ps(load16_avx512(row + k, mask), d);
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    _mm_mask_storeu_epi8(codes + k, mask, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
}

template <typename T>
void quantize_int8_rows(const T* w, int64_t ldw, int64_t N, int64_t K, int8_t* q, T* scales, bool avx512) {
  constexpr bool vector = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* row = w + n * ldw;
      float amax = 0.f;
      if (vector && avx512) {
        amax = row_amax_avx512(row, K);
      } else {
        for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(static_cast<float>(row[k])));
      }
      scales[n] = static_cast<T>(amax / 127.f);
      const float scale = static_cast<float>(scales[n]);
      int8_t* codes = q + n * K;
      if (!(scale > 0.f)) {
        std::memset(codes, 0, K);
        continue;
      }
      const float div = std::max(scale, std::numeric_limits<float>::min());
      if (vector && avx512) {
        row_codes_avx512(row, K, div, codes);
        continue;
      }
      for (int64_t k = 0; k < K; ++k)
        codes[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(static_cast<float>(row[k]) / div))));
    }
  });
}

// codellama.quantize's int4 of a float weight in one pass (its quantize_int4, bit for bit), K a multiple of G:
// per group of G inputs, scale = (max - min) / 15 and zero = min + 8 * scale, each rounded to the weight's dtype
// in turn; codes (w - zero) / scale + 8 (scale at least the smallest normal float; 8 where it is 0) rounded half
// to even and clamped to [0, 15]; byte j of a group holds input j (low nibble) and input j + G/2 (high).
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
void group4_avx512(const T* v, int64_t G, float scale, float zero, uint8_t* packed) {
  const __m512 s = _mm512_set1_ps(std::max(scale, std::numeric_limits<float>::min())), z = _mm512_set1_ps(zero);
  const __m512 eight = _mm512_set1_ps(8.f), fifteen = _mm512_set1_ps(15.f), none = _mm512_setzero_ps();
  for (int64_t j = 0; j < G / 2; j += 16) {
    __m128i nibbles[2];
    for (int half = 0; half < 2; ++half) {
      __m512 t = scale > 0.f ? _mm512_add_ps(_mm512_div_ps(_mm512_sub_ps(load16_avx512(v + half * G / 2 + j, 0xFFFF), z), s), eight)
                             : eight;
      t = _mm512_min_ps(fifteen, _mm512_max_ps(none, _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
      nibbles[half] = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + j), _mm_or_si128(nibbles[0], _mm_slli_epi16(nibbles[1], 4)));
  }
}

template <typename T>
void quantize_int4_rows(const T* w, int64_t ldw, int64_t N, int64_t K, int64_t G, uint8_t* q, T* scales, T* zeros,
                        bool avx512) {
  constexpr bool vector = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;
  const int64_t groups = K / G;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> f(G);
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        const T* v = w + n * ldw + g * G;
        float lo = static_cast<float>(v[0]), hi = lo;
        for (int64_t k = 0; k < G; ++k) {
          f[k] = static_cast<float>(v[k]);
          lo = std::min(lo, f[k]);
          hi = std::max(hi, f[k]);
        }
        const T scale_t = static_cast<T>((hi - lo) / 15.f);
        const float scale = static_cast<float>(scale_t);
        const T zero_t = static_cast<T>(lo + 8.f * scale);
        const float zero = static_cast<float>(zero_t);
        scales[n * groups + g] = scale_t;
        zeros[n * groups + g] = zero_t;
        uint8_t* packed = q + n * (K / 2) + g * (G / 2);
        if (vector && avx512 && G % 32 == 0) {
          group4_avx512(v, G, scale, zero, packed);
          continue;
        }
        const float div = std::max(scale, std::numeric_limits<float>::min());
        auto code = [&](float x) -> uint8_t {
          const float t = scale > 0.f ? (x - zero) / div + 8.f : 8.f;
          return static_cast<uint8_t>(std::min(15.f, std::max(0.f, std::nearbyint(t))));
        };
        for (int64_t j = 0; j < G / 2; ++j) packed[j] = code(f[j]) | static_cast<uint8_t>(code(f[j + G / 2]) << 4);
      }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4(const at::Tensor& w, int64_t group_size, int64_t isa) {
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "w must be (N, K) with contiguous rows");
  const int64_t N = w.size(0), K = w.size(1), G = group_size;
  TORCH_CHECK(G > 0 && G % 2 == 0 && K % G == 0, "K (", K, ") must be a multiple of the even group size (", G, ")");
  at::Tensor q = at::empty({N, K / 2}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({N, K / G}, w.options()), zeros = at::empty({N, K / G}, w.options());
  const bool avx512 = isa == AVX512_VNNI;
  uint8_t* qp = q.data_ptr<uint8_t>();
  if (w.scalar_type() == at::kFloat)
    quantize_int4_rows(w.data_ptr<float>(), w.stride(0), N, K, G, qp, scales.data_ptr<float>(), zeros.data_ptr<float>(), avx512);
  else if (w.scalar_type() == at::kBFloat16)
    quantize_int4_rows(w.data_ptr<at::BFloat16>(), w.stride(0), N, K, G, qp, scales.data_ptr<at::BFloat16>(),
                       zeros.data_ptr<at::BFloat16>(), avx512);
  else if (w.scalar_type() == at::kHalf)
    quantize_int4_rows(w.data_ptr<at::Half>(), w.stride(0), N, K, G, qp, scales.data_ptr<at::Half>(), zeros.data_ptr<at::Half>(), false);
  else
    TORCH_CHECK(false, "w must be float32, bfloat16 or float16, not ", w.scalar_type());
  return {q, scales, zeros};
}

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& w, int64_t isa) {
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "w must be (N, K) with contiguous rows");
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor scales = at::empty({N}, w.options());
  if (w.scalar_type() == at::kFloat)
    quantize_int8_rows(w.data_ptr<float>(), w.stride(0), N, K, q.data_ptr<int8_t>(), scales.data_ptr<float>(), isa == AVX512_VNNI);
  else if (w.scalar_type() == at::kBFloat16)
    quantize_int8_rows(w.data_ptr<at::BFloat16>(), w.stride(0), N, K, q.data_ptr<int8_t>(), scales.data_ptr<at::BFloat16>(), isa == AVX512_VNNI);
  else if (w.scalar_type() == at::kHalf)
    quantize_int8_rows(w.data_ptr<at::Half>(), w.stride(0), N, K, q.data_ptr<int8_t>(), scales.data_ptr<at::Half>(), false);
  else
    TORCH_CHECK(false, "w must be float32, bfloat16 or float16, not ", w.scalar_type());
  return {q, scales};
}

// ----------------------------------------------------------------------------- dispatch
constexpr int64_t TILES_A_CHUNK = 4;  // tiles a thread takes at a time (64 rows)

// Tiles in parallel, each for every activation row, four rows at a time: tile(R, t, m) computes rows m..m+R-1.
template <typename Tile>
void run_tiles(int64_t M, int64_t N, const Tile& tile) {
  const int64_t Nt = (N + TILE - 1) / TILE;
  codellama::parallel_chunks(Nt, TILES_A_CHUNK, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      codellama::in_fours(M, [&](auto rows, int64_t m) { tile(rows, t, m); });
    }
  });
}

template <typename S>
void run_int4(const uint8_t* tiles, const S* sz, const Quantized& q, int64_t M, int64_t K, int64_t G, float* out,
              int64_t N, int64_t isa) {
  const int64_t tile_bytes = K / 2 * TILE, tile_sz = (K / G) * 2 * TILE;
  run_tiles(M, N, [&](auto rows, int64_t t, int64_t m) {
    constexpr int R = decltype(rows)::value;
    if (isa == AVX512_VNNI) tile_avx512<R, S>(tiles + t * tile_bytes, sz + t * tile_sz, q, m, K, G, out, N, t * TILE);
    else tile_avx2<R, S>(tiles + t * tile_bytes, sz + t * tile_sz, q, m, K, G, out, N, t * TILE);
  });
}

template <typename S>
void run_int8_rows(const int8_t* w, int64_t ldw, const S* sc, const at::Tensor& x, int64_t K, float* out, int64_t N,
                   int64_t isa) {
  const int64_t M = x.size(0);
  Quantized q;
  if (M <= ROWS_MAX) {  // the codes read in place
    const int64_t Kp = (K + 63) / 64 * 64;  // (whole chunks: the last one's blocks past K have a = 0, d = 0)
    if (x.scalar_type() == at::kFloat) quantize_rows(x.data_ptr<float>(), M, K, Kp, BLOCK8, 0, 0, q);
    else quantize_rows(x.data_ptr<at::BFloat16>(), M, K, Kp, BLOCK8, 0, 0, q);
    codellama::parallel_chunks(N, ROWS_A_CHUNK, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const int8_t* row = w + n * ldw;
        const float scale = scale_at(sc, n);
        codellama::in_fours(M, [&](auto r, int64_t m) {
          constexpr int R = decltype(r)::value;
          if (isa == AVX512_VNNI) row8_avx512<R, S>(row, scale, q, m, K, out + n, N);
          else row8_avx2<R, S>(row, scale, q, m, K, out + n, N);
        });
      }
    });
    return;
  }
  // more rows: each 16 rows packed into a tile (in cache), then the tile kernel for every activation row
  const int64_t Kp = (K + BLOCK8 - 1) / BLOCK8 * BLOCK8, Nt = (N + TILE - 1) / TILE;
  const int32_t offset = isa == AVX512_VNNI ? 128 : 0;
  if (x.scalar_type() == at::kFloat) quantize_rows(x.data_ptr<float>(), M, K, Kp, BLOCK8, offset, 0, q);
  else quantize_rows(x.data_ptr<at::BFloat16>(), M, K, Kp, BLOCK8, offset, 0, q);
  codellama::parallel_chunks(Nt, TILES_A_CHUNK, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<uint8_t> tile;  // (kept per thread: a prefill calls this ~7 times a layer)
    tile.resize(Kp * TILE);
    S scales[TILE] = {};
    for (int64_t t = t0; t < t1; ++t) {
      pack_tile8(w, ldw, N, K, Kp, t, isa == AVX512_VNNI, tile.data());
      std::memcpy(scales, sc + t * TILE, std::min<int64_t>(TILE, N - t * TILE) * sizeof(S));
      codellama::in_fours(M, [&](auto rows, int64_t m) {
        constexpr int R = decltype(rows)::value;
        if (isa == AVX512_VNNI) tile8_avx512<R, S>(tile.data(), scales, q, m, out, N, t * TILE);
        else tile8_avx2<R, S>(tile.data(), scales, q, m, out, N, t * TILE);
      });
    }
  });
}

at::Tensor int8_rows_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.stride(1) == 1,
              "w must be (N, K) int8 with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "x has ", K, " inputs, w ", w.size(1));
  TORCH_CHECK(scales.dim() == 1 && scales.numel() == N && scales.is_contiguous(), "scales must be contiguous (", N, ",)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16,
              "scales must be float32 or bfloat16");
  TORCH_CHECK(isa == AVX2 || isa == AVX512_VNNI, "isa must be 1 (AVX2) or 2 (AVX-512 VNNI)");
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  const int8_t* wp = w.data_ptr<int8_t>();
  if (scales.scalar_type() == at::kFloat) run_int8_rows(wp, w.stride(0), scales.data_ptr<float>(), x, K, out.data_ptr<float>(), N, isa);
  else run_int8_rows(wp, w.stride(0), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>()), x, K, out.data_ptr<float>(), N, isa);
  return out;
}

at::Tensor int4_tiles_linear(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& sz, int64_t group_size,
                             int64_t out_features, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, "group_size must be 32, 64 or 128");
  const int64_t M = x.size(0), K = x.size(1), G = group_size, N = out_features, Nt = (N + TILE - 1) / TILE;
  TORCH_CHECK(K % G == 0, "K (", K, ") must be a multiple of the group size (", G, ")");
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.numel() == Nt * TILE * K / 2,
              "tiles must be contiguous uint8 holding ", Nt, " tiles of ", K, " inputs");
  TORCH_CHECK(sz.is_contiguous() && sz.numel() == Nt * (K / G) * 2 * TILE, "sz does not match the tiles");
  TORCH_CHECK(sz.scalar_type() == at::kFloat || sz.scalar_type() == at::kBFloat16, "sz must be float32 or bfloat16");
  TORCH_CHECK(isa == AVX2 || isa == AVX512_VNNI, "isa must be 1 (AVX2) or 2 (AVX-512 VNNI)");
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  Quantized q;
  if (x.scalar_type() == at::kFloat) quantize_rows(x.data_ptr<float>(), M, K, K, G / 2, 8, G, q);
  else quantize_rows(x.data_ptr<at::BFloat16>(), M, K, K, G / 2, 8, G, q);
  const uint8_t* t = tiles.data_ptr<uint8_t>();
  if (sz.scalar_type() == at::kFloat) run_int4(t, sz.data_ptr<float>(), q, M, K, G, out.data_ptr<float>(), N, isa);
  else run_int4(t, reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>()), q, M, K, G, out.data_ptr<float>(), N, isa);
  return out;
}

int64_t bf16_supported_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

int64_t supported_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni"))
    return AVX512_VNNI;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
  return 0;
}

}  // namespace

TORCH_LIBRARY(codellama_native, m) {
  codellama::cpu_op(m, "int4_tiles_linear(Tensor x, Tensor tiles, Tensor sz, int group_size, int out_features, "
                       "int isa) -> Tensor", int4_tiles_linear);
  codellama::cpu_op(m, "int8_rows_linear(Tensor x, Tensor w, Tensor scales, int isa) -> Tensor", int8_rows_linear);
  codellama::cpu_op(m, "quantize_int8(Tensor w, int isa) -> (Tensor, Tensor)", quantize_int8);
  codellama::cpu_op(m, "quantize_int4(Tensor w, int group_size, int isa) -> (Tensor, Tensor, Tensor)", quantize_int4);
  m.def("supported_isa() -> int", &supported_isa);
  m.def("bf16_supported_isa() -> int", &bf16_supported_isa);
}
