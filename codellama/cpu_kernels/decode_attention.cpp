// One decode step's attention (one query per row) read straight from a bf16 KV cache (AVX-512): the eager CPU
// path otherwise copies every layer's keys and values to float32 for torch's SDPA, which at 7B and 256
// positions moved about three times the cache's bytes through memory each step (the copies written, then read).
//
// q (B, H, hd) bf16; k, v (B, Hkv, L, hd) bf16 with contiguous head vectors (any other strides: views of the
// cache); lengths (B,) int64: row b attends keys 0 .. lengths[b]-1. Query head h reads kv head h / (H / Hkv).
// Per (row, head), in float32: s_l = scale * q . k_l, p_l = exp(s_l - max s) / sum exp(s - max s), out = sum p_l v_l
// (exp: a degree-6 polynomial after range reduction, as Cephes' expf, within 2 ulp). Each (row, head) is
// computed on its own, so a row's result does not depend on the other rows.
//
// bytes read per call: the keys and values attended (2 * sum_b lengths[b] * Hkv * hd * 2) + the queries.

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

AVX512 inline __m512 widen16(const uint16_t* p) {  // 16 bf16 → 16 float32 (the bits to the upper half)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// exp(x) for x ≤ 0 (scores less their maximum); below -87.3, 0.
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(codellama_native, m) {
  m.def("decode_attention_bf16(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor");
  m.impl("decode_attention_bf16", c10::DispatchKey::CPU, &decode_attention_bf16);
}
