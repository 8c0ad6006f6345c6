// The parts of flash attention (head dim 64) that the mma.sync kernel
// (attention.cu) and the Hopper wgmma kernel (attention_sm90.cu) share: the
// asynchronous copies, Q's fragments, the online softmax over one tile of
// 64 keys, and the final scaling and store.
//
// Fragment layout (PTX's m16n8k16, which wgmma's m64nNk16 repeats per warp):
// lane = 4g + t holds, of each 8-column chunk nt of a 16-row tile, columns
// 2t and 2t + 1 of rows g (elements 0, 1) and g + 8 (elements 2, 3). Scores
// s[nt][*] and outputs acc[dt][*] use it; an A fragment a[0..3] holds rows
// g, g+8 at columns 2t.. and rows g, g+8 at columns 8 + 2t.. of 16 columns.
#pragma once

#include "common.cuh"

namespace {

constexpr int kD = 64;  // head dim

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; when !valid the destination is zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// 2^x on the SFU, denormal results flushed to zero: exp2f's range handling
// (three more instructions per call) only matters for results below 2^-126,
// which round to 0 in f16 and bf16 products anyway. FlashAttention's kernels
// get the same from --use_fast_math.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T> __device__ __forceinline__ uint32_t ld_u32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// The 16 rows of Q from row r0 of this (batch, head) as A fragments of the
// four 16-wide slices of the head dim; rows at or past n_q read as 0.
template <typename T>
__device__ __forceinline__ void load_q(uint32_t (&qf)[4][4], const T* qb, int r0, int n_q, int q_rs, int g, int t) {
  const int ra = r0 + g, rb = ra + 8;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const int c = kk * 16 + 2 * t;
    qf[kk][0] = ra < n_q ? ld_u32(qb + (long long)ra * q_rs + c) : 0u;
    qf[kk][1] = rb < n_q ? ld_u32(qb + (long long)rb * q_rs + c) : 0u;
    qf[kk][2] = ra < n_q ? ld_u32(qb + (long long)ra * q_rs + c + 8) : 0u;
    qf[kk][3] = rb < n_q ? ld_u32(qb + (long long)rb * q_rs + c + 8) : 0u;
  }
}

// Scores of keys at or past n_kv (in the tile of 8 * kN keys starting at
// key k0) to -inf.
template <int kN>
__device__ __forceinline__ void mask_tail(float (&s)[kN][4], int k0, int n_kv, int t) {
  if (k0 + 8 * kN <= n_kv) return;
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) {
    const int key = k0 + nt * 8 + 2 * t;
    if (key >= n_kv) s[nt][0] = s[nt][2] = -INFINITY;
    if (key + 1 >= n_kv) s[nt][1] = s[nt][3] = -INFINITY;
  }
}

// One tile (kN chunks of 8 keys) of the online softmax for rows g (m0, l0)
// and g + 8 (m1, l1), the output accumulators aside: the running maxima
// (log2 domain) move to include this tile's scores s, p = exp2(s *
// scale_log2 - max) (p may be s itself), this thread's share of the row sums
// is rescaled and grows by p's, and c0, c1 are the factors the accumulators
// must be rescaled by (rescale) before p · v adds to them.
template <int kN>
__device__ __forceinline__ void softmax_exp(const float (&s)[kN][4], float (&p)[kN][4], float& m0, float& m1,
                                            float& l0, float& l1, float scale_log2, float& c0, float& c1) {
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) {
    mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
    mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
  }
  const float new0 = fmaxf(m0, mx0 * scale_log2), new1 = fmaxf(m1, mx1 * scale_log2);
  c0 = exp2_ftz(m0 - new0);
  c1 = exp2_ftz(m1 - new1);
  m0 = new0;
  m1 = new1;
  l0 *= c0;
  l1 *= c1;
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) {
    p[nt][0] = exp2_ftz(s[nt][0] * scale_log2 - new0);
    p[nt][1] = exp2_ftz(s[nt][1] * scale_log2 - new0);
    p[nt][2] = exp2_ftz(s[nt][2] * scale_log2 - new1);
    p[nt][3] = exp2_ftz(s[nt][3] * scale_log2 - new1);
    l0 += p[nt][0] + p[nt][1];
    l1 += p[nt][2] + p[nt][3];
  }
}

// The output accumulators of rows g and g + 8 times c0 and c1.
__device__ __forceinline__ void rescale(float (&acc)[8][4], float c0, float c1) {
#pragma unroll
  for (int dt = 0; dt < 8; ++dt) {
    acc[dt][0] *= c0;
    acc[dt][1] *= c0;
    acc[dt][2] *= c1;
    acc[dt][3] *= c1;
  }
}

// p packed to T as the A fragments of p · v (p's layout is the score
// accumulators').
template <typename T, int kN>
__device__ __forceinline__ void pack_p(const float (&p)[kN][4], uint32_t (&pa)[kN / 2][4]) {
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) {
    const int kk = nt >> 1, hi = (nt & 1) * 2;
    pa[kk][hi] = pack2<T>(p[nt][0], p[nt][1]);
    pa[kk][hi + 1] = pack2<T>(p[nt][2], p[nt][3]);
  }
}

// softmax_exp with the accumulators rescaled and p packed at once.
template <typename T, int kN>
__device__ __forceinline__ void online_softmax(const float (&s)[kN][4], float& m0, float& m1, float& l0, float& l1,
                                               float (&acc)[8][4], uint32_t (&pa)[kN / 2][4], float scale_log2) {
  float p[kN][4], c0, c1;
  softmax_exp(s, p, m0, m1, l0, l1, scale_log2, c0, c1);
  rescale(acc, c0, c1);
  pack_p<T, kN>(p, pa);
}

// o's rows r0 + g and r0 + g + 8 (those before n_q): the accumulators over
// the full row sums, rounded once to T.
template <typename T>
__device__ __forceinline__ void store_rows(T* ob, int o_rs, int r0, int n_q, const float (&acc)[8][4], float l0,
                                           float l1, int g, int t) {
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const float inv0 = 1.f / l0, inv1 = 1.f / l1;
  const int ra = r0 + g, rb = ra + 8;
#pragma unroll
  for (int dt = 0; dt < 8; ++dt) {
    const int col = dt * 8 + 2 * t;
    if (ra < n_q)
      *reinterpret_cast<uint32_t*>(ob + (long long)ra * o_rs + col) = pack2<T>(acc[dt][0] * inv0, acc[dt][1] * inv0);
    if (rb < n_q)
      *reinterpret_cast<uint32_t*>(ob + (long long)rb * o_rs + col) = pack2<T>(acc[dt][2] * inv1, acc[dt][3] * inv1);
  }
}

}  // namespace
