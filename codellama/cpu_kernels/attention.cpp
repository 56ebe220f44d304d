// Attention read straight from a bf16 KV cache (AVX-512), the two CPU cases torch serves slowly:
//
// decode_attention_bf16: one decode step (one query per row). The eager CPU path otherwise copies every layer's
// keys and values to float32 for torch's SDPA, which at 7B and 256 positions moved about three times the
// cache's bytes through memory each step (the copies written, then read).
//   q (B, H, hd) bf16; k, v (B, Hkv, L, hd) bf16 with contiguous head vectors (any other strides: views of the
//   cache); lengths (B,) int64: row b attends keys 0 .. lengths[b]-1. Query head h reads kv head h / (H / Hkv).
//   Per (row, head), in float32: s_l = scale * q . k_l, p_l = exp(s_l - max s) / sum exp(s - max s), out = sum p_l v_l
//   (exp: a degree-6 polynomial after range reduction, as Cephes' expf, within 2 ulp). Each (row, head) is
//   computed on its own, so a row's result does not depend on the other rows.
//   bytes read per call: the keys and values attended (2 * sum_b lengths[b] * Hkv * hd * 2) + the queries.
//
// prefill_attention_bf16: a prompt chunk (T queries a row, at positions starts[b] + t, each over keys
// 0 .. starts[b] + t), with AVX-512 BF16 dot products (`vdpbf16ps`). torch's CPU flash attention ran at about a
// third of the machine's bf16 matrix-product rate here (many small GEMM calls a head); at 194M parameters and
// 2,000-token editor prompts it was 45% of a prefill.
//   q (B, H, T, hd), k, v (B, Hkv, L, hd) bf16 with contiguous head vectors; starts (B,) int64, starts[b] + T <= L.
//   Flash attention's online softmax over blocks of 64 keys at absolute positions (0-63, 64-127, ...), 32
//   queries together (a query a float32 lane): scores s = scale * q . k in float32 (products of bf16 are exact,
//   summed in float32); the running maximum, exp (as above) and sums in float32; the probabilities rounded to
//   bf16 for the values' products (as torch's flash attention does), accumulated in float32. Every query's
//   arithmetic is its own and the same whichever chunk or lane it is computed in, so a prompt fed in chunks of
//   any size gives the same bits as fed at once.
//   bytes: the values are copied once a call into pairs along the keys (`vdpbf16ps` multiplies pairs), into a
//   buffer the calling thread keeps (half again the largest call's values: at 7B and 16k positions, 192 MB).

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include "library.h"
#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

AVX512 inline __m512 widen16(const uint16_t* p) {  // 16 bf16 → 16 float32 (the bits to the upper half)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// exp(x) for x ≤ 0 (scores less their maximum); below -87.3, exp(-87.3) ≈ 1.2e-38, not 0 (the prefill zeroes what
// must be 0 itself).
AVX512 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n ln2, ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));  // 1 + r + r² P(r)
  return _mm512_scalef_ps(p, n);  // p · 2^n
}

// One (row, head): NV registers of 16 floats hold a head vector (hd = 16 NV).
template <int NV>
AVX512 void head(const uint16_t* q, const uint16_t* k, int64_t k_step, const uint16_t* v, int64_t v_step,
                 int64_t len, float scale, float* scores, float* out) {
  __m512 qf[NV];
  for (int j = 0; j < NV; ++j) qf[j] = _mm512_mul_ps(widen16(q + 16 * j), _mm512_set1_ps(scale));
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < len; ++l) {
    const uint16_t* kl = k + l * k_step;
    __m512 acc = _mm512_mul_ps(qf[0], widen16(kl));
    for (int j = 1; j < NV; ++j) acc = _mm512_fmadd_ps(qf[j], widen16(kl + 16 * j), acc);
    scores[l] = _mm512_reduce_add_ps(acc);
    top = std::max(top, scores[l]);
  }
  __m512 total = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(top);
  for (int64_t l = 0; l < len; l += 16) {
    const __mmask16 mask = len - l >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (len - l)) - 1u);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + l), shift));
    _mm512_mask_storeu_ps(scores + l, mask, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, e));
  }
  __m512 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t l = 0; l < len; ++l) {
    const __m512 p = _mm512_set1_ps(scores[l]);
    const uint16_t* vl = v + l * v_step;
    for (int j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(p, widen16(vl + 16 * j), acc[j]);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int j = 0; j < NV; ++j) _mm512_storeu_ps(out + 16 * j, _mm512_mul_ps(acc[j], inv));
}

at::Tensor decode_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == at::kBFloat16, "q must be contiguous (B, H, hd) bf16");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16 && k.stride(3) == 1 && v.stride(3) == 1,
              "k and v must be (B, Hkv, L, hd) bf16 with contiguous head vectors");
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == hd && Hkv > 0 && H % Hkv == 0, "q (", q.sizes(), ") does not match k (",
              k.sizes(), ")");
  TORCH_CHECK(hd == 16 || hd == 32 || hd == 64 || hd == 128, "head size must be 16, 32, 64 or 128, not ", hd);
  TORCH_CHECK(lengths.dim() == 1 && lengths.numel() == B && lengths.scalar_type() == at::kLong && lengths.is_contiguous(),
              "lengths must be (B,) int64");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(len[b] >= 1 && len[b] <= L, "lengths[", b, "] = ", len[b], " is not in 1..", L);
  at::Tensor out = at::empty({B, H, hd}, q.options().dtype(at::kFloat));
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  float* o = out.data_ptr<float>();
  const int64_t group = H / Hkv;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(L + 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const uint16_t* kh = kp + b * k.stride(0) + g * k.stride(1);
      const uint16_t* vh = vp + b * v.stride(0) + g * v.stride(1);
      const uint16_t* qh = qp + i * hd;
      float* oh = o + i * hd;
      const float s = static_cast<float>(scale);
      switch (hd / 16) {
        case 1: head<1>(qh, kh, k.stride(2), vh, v.stride(2), len[b], s, scores.data(), oh); break;
        case 2: head<2>(qh, kh, k.stride(2), vh, v.stride(2), len[b], s, scores.data(), oh); break;
        case 4: head<4>(qh, kh, k.stride(2), vh, v.stride(2), len[b], s, scores.data(), oh); break;
        default: head<8>(qh, kh, k.stride(2), vh, v.stride(2), len[b], s, scores.data(), oh); break;
      }
    }
  });
  return out;
}


// ----------------------------------------------------------------------------- prefill
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int QV = 2;        // query vectors a group (16 queries each, a query a lane)
constexpr int QN = 16 * QV;  // queries a group
constexpr int KB = 64;       // keys a block, at absolute positions KB j .. KB j + KB - 1
constexpr int KR = 8;        // keys a step of the scores' product

inline uint32_t pair_at(const uint16_t* p) {  // two bf16 as one 32-bit value (as vdpbf16ps reads them)
  uint32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

// One kv head's values in pairs along the keys: vp[(l / 2) * hd + d] = v[l][d] | v[l + 1][d] << 16, rows from
// L on zero: no query of the row sees them, and a NaN or inf left there by an earlier request of the slot would
// make 0 * NaN in the products.
AVX512BF16 void pack_values(const uint16_t* v, int64_t v_step, int64_t L, int64_t Lp, int64_t hd, uint32_t* vp) {
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int j = 0; j < 16; ++j) {
    lo_idx[2 * j] = j, lo_idx[2 * j + 1] = 32 + j;
    hi_idx[2 * j] = 16 + j, hi_idx[2 * j + 1] = 48 + j;
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t l = 0; l < Lp; l += 2) {
    for (int64_t d = 0; d < hd; d += 32) {
      const __m512i a = l < L ? _mm512_loadu_si512(v + l * v_step + d) : _mm512_setzero_si512();
      const __m512i b = l + 1 < L ? _mm512_loadu_si512(v + (l + 1) * v_step + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + (l / 2) * hd + d, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(vp + (l / 2) * hd + d + 16, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// Up to QN queries of one head (rows of q, q_step apart, at positions pos[0..nq-1], increasing) over keys
// 0 .. pos[i]; out rows out_step apart, float32. NV: 16-float vectors a head vector (hd = 16 NV).
template <int NV>
AVX512BF16 void prefill_group(const uint16_t* q, int64_t q_step, int nq, const int64_t* pos, const uint16_t* k,
                              int64_t k_step, const uint32_t* vp, int64_t L, float scale, float* out,
                              int64_t out_step) {
  constexpr int HD = 16 * NV, P2 = HD / 2, DV = NV < 4 ? NV : 4;  // DV: value vectors a step of P V
  alignas(64) uint32_t qp[P2][QN];      // the queries in pairs along the head dim, a query a lane
  alignas(64) float s[KB][QN];          // a block's scores, then probabilities
  alignas(64) uint32_t pp[KB / 2][QN];  // the probabilities in bf16 pairs along the keys
  alignas(64) float acc[QN][HD];
  alignas(64) float corr[QN];
  alignas(64) int32_t qpos[QN];
  for (int i = 0; i < QN; ++i) {
    const int r = std::min(i, nq - 1);  // (lanes past nq repeat the last query: computed, not written)
    qpos[i] = static_cast<int32_t>(pos[r]);
    for (int p = 0; p < P2; ++p) qp[p][i] = pair_at(q + r * q_step + 2 * p);
  }
  std::memset(acc, 0, sizeof(acc));
  const int64_t first = qpos[0], last = qpos[QN - 1];
  __m512 m[QV], total[QV];
  __m512i lane_pos[QV];
  for (int u = 0; u < QV; ++u) {
    m[u] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    total[u] = _mm512_setzero_ps();
    lane_pos[u] = _mm512_load_si512(qpos + 16 * u);
  }
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t l0 = 0; l0 <= last; l0 += KB) {
    // scores: s[r][i] = scale * q_i . k_{l0 + r}
    for (int r0 = 0; r0 < KB; r0 += KR) {
      __m512 a[KR][QV];
      const uint16_t* kr[KR];
      for (int j = 0; j < KR; ++j) {
        for (int u = 0; u < QV; ++u) a[j][u] = _mm512_setzero_ps();
        kr[j] = k + std::min<int64_t>(l0 + r0 + j, L - 1) * k_step;  // (keys past L: masked below)
      }
      for (int p = 0; p < P2; ++p) {
        __m512bh qv[QV];
        for (int u = 0; u < QV; ++u) qv[u] = (__m512bh)_mm512_load_si512(qp[p] + 16 * u);
        for (int j = 0; j < KR; ++j) {
          const __m512bh kj = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair_at(kr[j] + 2 * p)));
          for (int u = 0; u < QV; ++u) a[j][u] = _mm512_dpbf16_ps(a[j][u], kj, qv[u]);
        }
      }
      for (int j = 0; j < KR; ++j)
        for (int u = 0; u < QV; ++u) _mm512_store_ps(s[r0 + j] + 16 * u, _mm512_mul_ps(a[j][u], _mm512_set1_ps(scale)));
    }
    // the online softmax: keys past a query's position are out (probability exactly 0)
    const bool masked = l0 + KB - 1 > first;
    for (int u = 0; u < QV; ++u) {
      __m512 top = minus_inf;
      for (int r = 0; r < KB; ++r) {
        __m512 x = _mm512_load_ps(s[r] + 16 * u);
        if (masked) {
          x = _mm512_mask_mov_ps(minus_inf, _mm512_cmple_epi32_mask(_mm512_set1_epi32(l0 + r), lane_pos[u]), x);
          _mm512_store_ps(s[r] + 16 * u, x);
        }
        top = _mm512_max_ps(top, x);
      }
      const __m512 now = _mm512_max_ps(m[u], top);  // finite: key 0 is in every query's first block
      const __m512 c = exp_nonpositive(_mm512_sub_ps(m[u], now));  // 1 where nothing new (exactly)
      __m512 sum = _mm512_setzero_ps();
      for (int r = 0; r < KB; ++r) {
        __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(s[r] + 16 * u), now));
        if (masked) e = _mm512_maskz_mov_ps(_mm512_cmple_epi32_mask(_mm512_set1_epi32(l0 + r), lane_pos[u]), e);
        _mm512_store_ps(s[r] + 16 * u, e);
        sum = _mm512_add_ps(sum, e);
      }
      total[u] = _mm512_add_ps(_mm512_mul_ps(total[u], c), sum);
      m[u] = now;
      _mm512_store_ps(corr + 16 * u, c);
    }
    for (int r = 0; r < KB; r += 2)
      for (int u = 0; u < QV; ++u) {
        const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(s[r] + 16 * u)));
        const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(s[r + 1] + 16 * u)));
        _mm512_store_si512(pp[r / 2] + 16 * u, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    // acc = acc * corr + P V, four queries by DV value vectors at a time
    const uint32_t* vb = vp + (l0 / 2) * HD;
    for (int i0 = 0; i0 < QN; i0 += 4) {
      if (qpos[i0 + 3] < l0) continue;  // (a block past these queries: nothing to add, corr is 1)
      for (int d0 = 0; d0 < HD; d0 += 16 * DV) {
        __m512 o[4][DV];
        for (int ii = 0; ii < 4; ++ii) {
          const __m512 c = _mm512_set1_ps(corr[i0 + ii]);
          for (int j = 0; j < DV; ++j) o[ii][j] = _mm512_mul_ps(_mm512_load_ps(acc[i0 + ii] + d0 + 16 * j), c);
        }
        for (int r = 0; r < KB / 2; ++r) {
          __m512bh vv[DV];
          for (int j = 0; j < DV; ++j) vv[j] = (__m512bh)_mm512_loadu_si512(vb + r * HD + d0 + 16 * j);
          for (int ii = 0; ii < 4; ++ii) {
            const __m512bh pr = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[r][i0 + ii]));
            for (int j = 0; j < DV; ++j) o[ii][j] = _mm512_dpbf16_ps(o[ii][j], pr, vv[j]);
          }
        }
        for (int ii = 0; ii < 4; ++ii)
          for (int j = 0; j < DV; ++j) _mm512_store_ps(acc[i0 + ii] + d0 + 16 * j, o[ii][j]);
      }
    }
  }
  alignas(64) float inv[QN];
  for (int u = 0; u < QV; ++u) _mm512_store_ps(inv + 16 * u, _mm512_div_ps(_mm512_set1_ps(1.f), total[u]));
  for (int i = 0; i < nq; ++i)
    for (int d = 0; d < HD; d += 16)
      _mm512_storeu_ps(out + i * out_step + d, _mm512_mul_ps(_mm512_load_ps(acc[i] + d), _mm512_set1_ps(inv[i])));
}

// The prefill's attention; returns (B, H, T, hd) float32 (its memory laid out (B, T, H, hd), as the output
// projection reads it).
at::Tensor prefill_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& starts, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kBFloat16 && q.stride(3) == 1,
              "q must be (B, H, T, hd) bf16 with contiguous head vectors");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16 && k.stride(3) == 1 && v.stride(3) == 1,
              "k and v must be (B, Hkv, L, hd) bf16 with contiguous head vectors");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == hd && Hkv > 0 && H % Hkv == 0, "q (", q.sizes(), ") does not match k (",
              k.sizes(), ")");
  TORCH_CHECK(hd == 32 || hd == 64 || hd == 128, "head size must be 32, 64 or 128, not ", hd);
  TORCH_CHECK(starts.dim() == 1 && starts.numel() == B && starts.scalar_type() == at::kLong && starts.is_contiguous(),
              "starts must be (B,) int64");
  const int64_t* st = starts.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(st[b] >= 0 && st[b] + T <= L, "starts[", b, "] = ", st[b], ": its queries' positions ", st[b],
                "..", st[b] + T - 1, " need keys up to there, and there are ", L);
  at::Tensor out = at::empty({B, T, H, hd}, q.options().dtype(at::kFloat));
  if (B == 0 || T == 0 || H == 0) return out.permute({0, 2, 1, 3});
  const int64_t Lp = (L + KB - 1) / KB * KB;
  // (a buffer this thread keeps: a fresh one each call, as large as a layer's values, was fresh pages to fault in,
  // a quarter of a 7B layer's attention at 16k positions)
  thread_local std::vector<uint32_t> packed;
  if (static_cast<int64_t>(packed.size()) < B * Hkv * (Lp / 2) * hd) {
    packed = std::vector<uint32_t>();
    packed.resize(B * Hkv * (Lp / 2) * hd * 3 / 2);
  }
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vsrc = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  uint32_t* vp = packed.data();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      pack_values(vsrc + (i / Hkv) * v.stride(0) + (i % Hkv) * v.stride(1), v.stride(2), st[i / Hkv] + T, Lp,
                  hd, vp + i * (Lp / 2) * hd);
  });
  float* o = out.data_ptr<float>();
  const int64_t groups = (T + QN - 1) / QN, group = H / Hkv;
  const float s = static_cast<float>(scale);
  // one item: QN queries of one head; the last groups (the most keys) first
  codellama::parallel_chunks(B * H * groups, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * groups), h = (i / groups) % H, t0 = (groups - 1 - i % groups) * QN;
      const int nq = static_cast<int>(std::min<int64_t>(QN, T - t0));
      int64_t pos[QN];
      for (int j = 0; j < nq; ++j) pos[j] = st[b] + t0 + j;
      const uint16_t* qh = qp + b * q.stride(0) + h * q.stride(1) + t0 * q.stride(2);
      const uint16_t* kh = kp + b * k.stride(0) + (h / group) * k.stride(1);
      const uint32_t* vh = vp + (b * Hkv + h / group) * (Lp / 2) * hd;
      float* oh = o + ((b * T + t0) * H + h) * hd;
      switch (hd / 16) {
        case 2: prefill_group<2>(qh, q.stride(2), nq, pos, kh, k.stride(2), vh, L, s, oh, H * hd); break;
        case 4: prefill_group<4>(qh, q.stride(2), nq, pos, kh, k.stride(2), vh, L, s, oh, H * hd); break;
        default: prefill_group<8>(qh, q.stride(2), nq, pos, kh, k.stride(2), vh, L, s, oh, H * hd); break;
      }
    }
  });
  return out.permute({0, 2, 1, 3});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(codellama_native, m) {
  codellama::cpu_op(m, "decode_attention_bf16(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor",
                    decode_attention_bf16);
  codellama::cpu_op(m, "prefill_attention_bf16(Tensor q, Tensor k, Tensor v, Tensor starts, float scale) -> Tensor",
                    prefill_attention_bf16);
}
