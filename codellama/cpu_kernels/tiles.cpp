// x @ W.T for int4 and int8 weights in 16-row tiles, with the activations quantized to int8: the integer dot
// products of llama.cpp's Q4_0 and Q8_0 paths (AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw` + `vpmaddwd`) on
// this library's codes. Each 64-byte chunk of a tile is one 512-bit register: lane i (an int32) of vpdpbusd
// sums row i's products with four activations.
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
// int8: W[n, k] = s[n] * q[n, k]   (codellama.quantize's int8: codes -128..127, a scale per row). Its layout
// (codellama/cpu_kernels/int8.py's int8_tiles):
//   tiles (Nt, Kp/4, 64) uint8: byte 4i+j of chunk c of tile t is row 16t+i's code of input 4c+j (a row's
//     4-byte runs moved whole); Kp = K rounded up to a block (padding: code 0);
//   sc (Nt, 16) bf16 or fp32: the rows' scales.
// The activations are quantized per block of B = 32 inputs (as llama.cpp's Q8_0); per row and block
//   sum_k q a = vpdpbusd(q + 128, a) - 128 * sum a   (q + 128: the sign bit flipped as a chunk is read,
//   since vpdpbusd multiplies unsigned by signed bytes; AVX2: |q| times a with q's sign, no offset)
// exact in int32; the row's output is s * sum_blocks d * sum_k q a.
// bytes read per call: Nt*(Kp*16 + 16*size(sc)) + M*K*size(x).

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include "parallel.h"

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t TILE = 16;  // output rows per tile: the int32 lanes of a 512-bit register
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
template <typename S>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
inline __m512 load16_avx512(const S* p) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_loadu_ps(p);
  } else {  // bf16: the upper half of a float32
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
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

// One int8 tile (16 output rows) for R activation rows starting at row m: for each block, eight chunks of
// vpdpbusd ((codes + 128) times a) from -128 * sum a, then d times that, summed in float; the rows' scales last.
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

// ----------------------------------------------------------------------------- dispatch
enum Isa : int64_t { AVX2 = 1, AVX512_VNNI = 2 };

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
void run_int8(const uint8_t* tiles, const S* sc, const Quantized& q, int64_t M, float* out, int64_t N, int64_t isa) {
  const int64_t tile_bytes = q.Kp * TILE;
  run_tiles(M, N, [&](auto rows, int64_t t, int64_t m) {
    constexpr int R = decltype(rows)::value;
    if (isa == AVX512_VNNI) tile8_avx512<R, S>(tiles + t * tile_bytes, sc + t * TILE, q, m, out, N, t * TILE);
    else tile8_avx2<R, S>(tiles + t * tile_bytes, sc + t * TILE, q, m, out, N, t * TILE);
  });
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

at::Tensor int8_tiles_linear(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& sc, int64_t out_features,
                             int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + BLOCK8 - 1) / BLOCK8 * BLOCK8, N = out_features;
  const int64_t Nt = (N + TILE - 1) / TILE;
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.dim() == 3 && tiles.size(0) == Nt &&
                  tiles.size(1) * 4 == Kp && tiles.size(2) == 64,
              "tiles must be contiguous uint8 (", Nt, ", ", Kp / 4, ", 64) for ", N, " rows of ", K, " inputs");
  TORCH_CHECK(sc.is_contiguous() && sc.numel() == Nt * TILE, "sc does not match the tiles");
  TORCH_CHECK(sc.scalar_type() == at::kFloat || sc.scalar_type() == at::kBFloat16, "sc must be float32 or bfloat16");
  TORCH_CHECK(isa == AVX2 || isa == AVX512_VNNI, "isa must be 1 (AVX2) or 2 (AVX-512 VNNI)");
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  Quantized q;
  const int32_t offset = isa == AVX512_VNNI ? 128 : 0;
  if (x.scalar_type() == at::kFloat) quantize_rows(x.data_ptr<float>(), M, K, Kp, BLOCK8, offset, 0, q);
  else quantize_rows(x.data_ptr<at::BFloat16>(), M, K, Kp, BLOCK8, offset, 0, q);
  const uint8_t* t = tiles.data_ptr<uint8_t>();
  if (sc.scalar_type() == at::kFloat) run_int8(t, sc.data_ptr<float>(), q, M, out.data_ptr<float>(), N, isa);
  else run_int8(t, reinterpret_cast<const uint16_t*>(sc.data_ptr<at::BFloat16>()), q, M, out.data_ptr<float>(), N, isa);
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
  m.def("int4_tiles_linear(Tensor x, Tensor tiles, Tensor sz, int group_size, int out_features, int isa) -> Tensor");
  m.impl("int4_tiles_linear", c10::DispatchKey::CPU, &int4_tiles_linear);
  m.def("int8_tiles_linear(Tensor x, Tensor tiles, Tensor sc, int out_features, int isa) -> Tensor");
  m.impl("int8_tiles_linear", c10::DispatchKey::CPU, &int8_tiles_linear);
  m.def("supported_isa() -> int", &supported_isa);
  m.def("bf16_supported_isa() -> int", &bf16_supported_isa);
}
