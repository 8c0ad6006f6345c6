// Fused CUDA kernels for the SDXL pipeline, compiled to PTX by worker/build.rs
// (nvcc, only with the `cuda` feature) and loaded by src/sdxl/cuda/.
//
//   flash_attn_d64_w{4,8}_*     softmax(q k^T * scale) v for head dim 64, reading
//                               q/k/v straight from the projections' [b, n, heads*64]
//                               layout and writing o in the same layout: no head
//                               split/merge copies, no n×n score matrix in memory.
//   group_norm_stats_* /        GroupNorm (+ optional SiLU) on NCHW in two passes:
//   group_norm_apply_*          shifted sums per chunk, then normalise + affine;
//                               optionally adds the producing convolution's bias first.
//   geglu_*                     x * gelu_erf(gate) over the two halves of a row.
//   upsample_nearest2x_*        nearest 2x upsampling, a 2x2 block per input element.
//
// All accumulation is in f32; results are rounded once to the storage type.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------
// Flash attention, head dim 64 (FlashAttention-2's forward pass on mma.sync).
// A block of kWarps warps owns 16 * kWarps query rows (16 per warp) of one
// (batch, head) and walks the keys in tiles of 64, double-buffered in shared
// memory by cp.async; more warps per block share each K/V tile among more
// queries (half the K/V traffic at 8 warps). Each warp reads its Q fragments
// straight from global memory, once. Scores and the running max/sum stay in
// registers; P is fed back to the tensor cores from registers (the
// accumulator layout of m16n8k16 is the A operand layout of the next product).
// ---------------------------------------------------------------------------

constexpr int kD = 64;         // head dim
constexpr int kTile = 64;      // keys per tile
constexpr int kLd = kD + 8;    // padded smem row (144 B): conflict-free fragment loads

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

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T> struct Mma;
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <typename T>
__device__ __forceinline__ uint32_t ld_u32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Strides are in elements; every row stride and the head offset are multiples
// of 8 (checked by the host), so each 8-element chunk is one 16-byte copy.
template <typename T, int kWarps>
__device__ __forceinline__ void flash_attn_d64(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, T* __restrict__ o, int n_q, int n_kv,
                                               long long q_bs, int q_rs, long long k_bs, int k_rs, long long v_bs,
                                               int v_rs, long long o_bs, int o_rs, float scale_log2) {
  constexpr int kThreads = 32 * kWarps;
  __shared__ __align__(16) T ks[2][kTile][kLd];
  __shared__ __align__(16) T vs[2][kTile][kLd];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
  const int q0 = blockIdx.x * 16 * kWarps, h = blockIdx.y, b = blockIdx.z;
  const T* qb = q + b * q_bs + h * kD;
  const T* kb = k + b * k_bs + h * kD;
  const T* vb = v + b * v_bs + h * kD;

  auto load_kv = [&](int tile, int buf) {
    const int k0 = tile * kTile;
    for (int i = tid; i < kTile * 8; i += kThreads) {
      const int r = i >> 3, c = (i & 7) * 8;
      const bool ok = k0 + r < n_kv;
      const long long row = ok ? k0 + r : 0;
      cp_async_16(&ks[buf][r][c], kb + row * k_rs + c, ok);
      cp_async_16(&vs[buf][r][c], vb + row * v_rs + c, ok);
    }
  };
  const int tiles = (n_kv + kTile - 1) / kTile;
  load_kv(0, 0);
  cp_async_commit();  // group 0: the first K/V tile

  // this warp's rows of Q as m16n8k16 A fragments (rows past n_q read as 0)
  const int qr = warp * 16 + g;
  uint32_t qf[4][4];
  {
    const int r0 = q0 + qr, r1 = r0 + 8;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int c = kk * 16 + 2 * t;
      qf[kk][0] = r0 < n_q ? ld_u32(qb + (long long)r0 * q_rs + c) : 0u;
      qf[kk][1] = r1 < n_q ? ld_u32(qb + (long long)r1 * q_rs + c) : 0u;
      qf[kk][2] = r0 < n_q ? ld_u32(qb + (long long)r0 * q_rs + c + 8) : 0u;
      qf[kk][3] = r1 < n_q ? ld_u32(qb + (long long)r1 * q_rs + c + 8) : 0u;
    }
  }
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY;  // running max (log2 domain) of rows g and g+8
  float l0 = 0.f, l1 = 0.f;              // this thread's share of the running sums

  for (int j = 0; j < tiles; ++j) {
    if (j + 1 < tiles) {
      load_kv(j + 1, (j + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int buf = j & 1;

    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int nt = 0; nt < 8; nt += 2) {
        // B fragments of key tiles nt and nt + 1: lanes 0-7 address keys
        // nt*8.. at dims kk*16.., lanes 8-15 the same keys at kk*16 + 8..,
        // lanes 16-31 the next eight keys likewise
        uint32_t r[4];
        ldmatrix_x4(r, &ks[buf][(nt + (lane >> 4)) * 8 + (lane & 7)][kk * 16 + ((lane >> 3) & 1) * 8]);
        Mma<T>::run(s[nt], qf[kk], r[0], r[1]);
        Mma<T>::run(s[nt + 1], qf[kk], r[2], r[3]);
      }
    }
    if ((j + 1) * kTile > n_kv) {  // keys past the end of the sequence
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int key = j * kTile + nt * 8 + 2 * t;
        if (key >= n_kv) s[nt][0] = s[nt][2] = -INFINITY;
        if (key + 1 >= n_kv) s[nt][1] = s[nt][3] = -INFINITY;
      }
    }

    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float new0 = fmaxf(m0, mx0 * scale_log2), new1 = fmaxf(m1, mx1 * scale_log2);
    const float c0 = exp2f(m0 - new0), c1 = exp2f(m1 - new1);
    m0 = new0;
    m1 = new1;
    l0 *= c0;
    l1 *= c1;
#pragma unroll
    for (int dt = 0; dt < 8; ++dt) {
      acc[dt][0] *= c0;
      acc[dt][1] *= c0;
      acc[dt][2] *= c1;
      acc[dt][3] *= c1;
    }

    uint32_t pa[4][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const float p0 = exp2f(s[nt][0] * scale_log2 - m0), p1 = exp2f(s[nt][1] * scale_log2 - m0);
      const float p2 = exp2f(s[nt][2] * scale_log2 - m1), p3 = exp2f(s[nt][3] * scale_log2 - m1);
      l0 += p0 + p1;
      l1 += p2 + p3;
      const int kk = nt >> 1, hi = (nt & 1) * 2;
      pa[kk][hi] = Mma<T>::pack(p0, p1);
      pa[kk][hi + 1] = Mma<T>::pack(p2, p3);
    }

#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int dp = 0; dp < 4; ++dp) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, &vs[buf][kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8][dp * 16 + (lane >> 4) * 8]);
        Mma<T>::run(acc[2 * dp], pa[kk], r[0], r[1]);
        Mma<T>::run(acc[2 * dp + 1], pa[kk], r[2], r[3]);
      }
    }
    __syncthreads();  // the next iteration's copy overwrites the buffer read here
  }

#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const float inv0 = 1.f / l0, inv1 = 1.f / l1;
  const int r0 = q0 + qr, r1 = r0 + 8;
  T* ob = o + b * o_bs + h * kD;
#pragma unroll
  for (int dt = 0; dt < 8; ++dt) {
    const int col = dt * 8 + 2 * t;
    if (r0 < n_q)
      *reinterpret_cast<uint32_t*>(ob + (long long)r0 * o_rs + col) = Mma<T>::pack(acc[dt][0] * inv0, acc[dt][1] * inv0);
    if (r1 < n_q)
      *reinterpret_cast<uint32_t*>(ob + (long long)r1 * o_rs + col) = Mma<T>::pack(acc[dt][2] * inv1, acc[dt][3] * inv1);
  }
}

// ---------------------------------------------------------------------------
// GroupNorm on contiguous NCHW. A group (one batch item, `cpg` channels) is a
// contiguous run of `group_size = cpg * hw` elements, cut into `splits` chunks.
// Pass 1 sums (x - pivot) and (x - pivot)^2 per chunk in f32, the pivot being
// the group's first element (shifted sums keep the variance accurate when the
// mean is large). Pass 2 folds the chunk sums (each block, cooperatively, in a
// fixed order: deterministic) and writes (x - mean) * rstd * gamma + beta,
// optionally through SiLU.
//
// `pre` (may be null) is a bias added to x before the norm, one value per
// (batch item, channel) when `pre_bs` = channels or per channel when 0: a
// convolution's bias (and the UNet's time embedding) fused into the norm that
// reads its output, instead of a pass of its own. The sum is rounded to T, as
// the separate bias add stored it.
//
// `vec`: hw and chunk are multiples of 8 and x, y start 16-byte aligned, so
// each thread moves 8 elements of one channel per load (the host checks).
// ---------------------------------------------------------------------------

template <typename T>
struct alignas(16) Pack8 {
  T e[8];
};

__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float sa[32], sb[32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < warps ? sa[lane] : 0.f;
    b = lane < warps ? sb[lane] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, off);
      b += __shfl_xor_sync(0xffffffffu, b, off);
    }
  }
}

// block_sum2, with the totals handed to every thread.
__device__ __forceinline__ void block_sum2_all(float& a, float& b) {
  __shared__ float tot[2];
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    tot[0] = a;
    tot[1] = b;
  }
  __syncthreads();
  a = tot[0];
  b = tot[1];
}

// x (+ the pre-norm bias of channel c, rounded to T as a stored sum would be)
template <typename T>
__device__ __forceinline__ float gn_in(T x, float pre) {
  return pre == 0.f ? to_f32(x) : to_f32(from_f32<T>(to_f32(x) + pre));
}

template <typename T>
__device__ __forceinline__ void group_norm_stats(const T* __restrict__ x, const T* __restrict__ pre,
                                                 long long pre_bs, float* __restrict__ partial,
                                                 long long group_size, long long chunk, int splits, int groups,
                                                 int cpg, long long hw, int vec) {
  const int grp = blockIdx.y, s = blockIdx.x;
  const T* xg = x + grp * group_size;
  const T* pg = pre == nullptr ? nullptr : pre + (grp / groups) * pre_bs + (grp % groups) * cpg;
  const float pivot = gn_in(xg[0], pg == nullptr ? 0.f : to_f32(pg[0]));
  const long long start = s * chunk, end = min(start + chunk, group_size);
  float s1 = 0.f, s2 = 0.f;
  if (vec) {
    for (long long i = start + threadIdx.x * 8LL; i < end; i += blockDim.x * 8LL) {
      const Pack8<T> p = *reinterpret_cast<const Pack8<T>*>(xg + i);
      const float b = pg == nullptr ? 0.f : to_f32(pg[i / hw]);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float d = gn_in(p.e[j], b) - pivot;
        s1 += d;
        s2 += d * d;
      }
    }
  } else {
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
      const float d = gn_in(xg[i], pg == nullptr ? 0.f : to_f32(pg[i / hw])) - pivot;
      s1 += d;
      s2 += d * d;
    }
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    partial[(grp * (long long)splits + s) * 2] = s1;
    partial[(grp * (long long)splits + s) * 2 + 1] = s2;
  }
}

template <typename T>
__device__ __forceinline__ void group_norm_apply(const T* __restrict__ x, const T* __restrict__ pre,
                                                 long long pre_bs, const T* __restrict__ gamma,
                                                 const T* __restrict__ beta, const float* __restrict__ partial,
                                                 T* __restrict__ y, long long group_size, long long chunk,
                                                 int splits, int groups, int cpg, long long hw, float eps,
                                                 int silu, int vec) {
  const int grp = blockIdx.y, s = blockIdx.x;
  const T* xg = x + grp * group_size;
  const T* pg = pre == nullptr ? nullptr : pre + (grp / groups) * pre_bs + (grp % groups) * cpg;
  T* yg = y + grp * group_size;
  float s1 = 0.f, s2 = 0.f;
  for (int i = threadIdx.x; i < splits; i += blockDim.x) {
    s1 += partial[(grp * (long long)splits + i) * 2];
    s2 += partial[(grp * (long long)splits + i) * 2 + 1];
  }
  block_sum2_all(s1, s2);
  const float n = (float)group_size;
  const float dmean = s1 / n;
  const float var = fmaxf(s2 / n - dmean * dmean, 0.f);
  const float mean = gn_in(xg[0], pg == nullptr ? 0.f : to_f32(pg[0])) + dmean;
  const float rstd = rsqrtf(var + eps);
  const int c0 = (grp % groups) * cpg;
  const long long start = s * chunk, end = min(start + chunk, group_size);
  if (vec) {
    for (long long i = start + threadIdx.x * 8LL; i < end; i += blockDim.x * 8LL) {
      const int cl = (int)(i / hw);
      const float b = pg == nullptr ? 0.f : to_f32(pg[cl]);
      const float sc = rstd * to_f32(gamma[c0 + cl]), sh = to_f32(beta[c0 + cl]);
      const Pack8<T> p = *reinterpret_cast<const Pack8<T>*>(xg + i);
      Pack8<T> o;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float v = (gn_in(p.e[j], b) - mean) * sc + sh;
        if (silu) v = v / (1.f + __expf(-v));
        o.e[j] = from_f32<T>(v);
      }
      *reinterpret_cast<Pack8<T>*>(yg + i) = o;
    }
    return;
  }
  for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
    const int cl = (int)(i / hw);
    float v = (gn_in(xg[i], pg == nullptr ? 0.f : to_f32(pg[cl])) - mean) * rstd * to_f32(gamma[c0 + cl]) +
              to_f32(beta[c0 + cl]);
    if (silu) v = v / (1.f + __expf(-v));
    yg[i] = from_f32<T>(v);
  }
}

// ---------------------------------------------------------------------------
// GEGLU: h is [rows, 2*inner]; out[r, c] = h[r, c] * gelu_erf(h[r, inner + c]).
// `vec`: inner is a multiple of 8 and h, out start 16-byte aligned: 8 outputs
// per thread from two 16-byte loads.
// ---------------------------------------------------------------------------

__device__ __forceinline__ float geglu1(float xv, float gv) {
  return xv * 0.5f * gv * (1.f + erff(gv * 0.70710678118654752f));
}

template <typename T>
__device__ __forceinline__ void geglu(const T* __restrict__ h, T* __restrict__ out, long long rows, int inner,
                                      int vec) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (vec) {
    const int per_row = inner / 8;
    const long long nv = rows * per_row;
    for (long long v = first; v < nv; v += stride) {
      const long long r = v / per_row;
      const int c = (int)(v - r * per_row) * 8;
      const Pack8<T> xs = *reinterpret_cast<const Pack8<T>*>(h + r * 2 * inner + c);
      const Pack8<T> gs = *reinterpret_cast<const Pack8<T>*>(h + r * 2 * inner + inner + c);
      Pack8<T> o;
#pragma unroll
      for (int j = 0; j < 8; ++j) o.e[j] = from_f32<T>(geglu1(to_f32(xs.e[j]), to_f32(gs.e[j])));
      *reinterpret_cast<Pack8<T>*>(out + r * inner + c) = o;
    }
    return;
  }
  const long long n = rows * inner;
  for (long long i = first; i < n; i += stride) {
    const long long r = i / inner;
    const int c = (int)(i - r * inner);
    out[i] = from_f32<T>(geglu1(to_f32(h[r * 2 * inner + c]), to_f32(h[r * 2 * inner + inner + c])));
  }
}

// ---------------------------------------------------------------------------
// Nearest-neighbour 2x upsampling of contiguous [planes, h, w] into
// [planes, 2h, 2w]: one thread per input element writes its 2x2 block as two
// pairs (output rows 2r and 2r + 1 of the plane-row r), so both the reads and
// the writes are coalesced and there is no index arithmetic per output.
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void upsample_nearest2x(const T* __restrict__ x, T* __restrict__ y, long long n, int w) {
  struct alignas(2 * sizeof(T)) Pair {
    T a, b;
  };
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
    const long long row = i / w;
    const int col = (int)(i - row * w);
    const T v = x[i];
    T* out = y + row * 4 * w + 2 * col;
    *reinterpret_cast<Pair*>(out) = Pair{v, v};
    *reinterpret_cast<Pair*>(out + 2 * w) = Pair{v, v};
  }
}

// ---------------------------------------------------------------------------
// In-place bias add: x[i] += bias[batch * bias_bs + channel] (+ res[i] when
// res is not null: a residual connection in the same pass), where x is
// contiguous [batch, c, inner] (inner = 1 for a Linear's [rows, c] output,
// inner = h*w for NCHW; bias_bs = c for a per-sample bias such as the UNet's
// time embedding, 0 for a shared one). Eight elements per step when they
// share one channel (inner % 8 == 0) or are eight channels (inner == 1).
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void bias_add(T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ res,
                                         long long n, long long inner, int c, long long bias_bs) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  // every 8-element run is 16-byte aligned: n % 8 == 0 and the host passes
  // storage that starts on a 16-byte boundary
  const bool vec = (inner % 8 == 0 || (inner == 1 && c % 8 == 0)) && n % 8 == 0;
  if (vec) {
    using Pack = Pack8<T>;
    for (long long v = first; v < n / 8; v += stride) {
      const long long i = v * 8;
      Pack p = *reinterpret_cast<const Pack*>(x + i);
      float r[8];
      if (res != nullptr) {
        const Pack q = *reinterpret_cast<const Pack*>(res + i);
#pragma unroll
        for (int j = 0; j < 8; ++j) r[j] = to_f32(q.e[j]);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) r[j] = 0.f;
      }
      if (inner == 1) {
        const long long bt = i / c;
        const int ch = (int)(i - bt * c);
        const T* b = bias + bt * bias_bs + ch;
#pragma unroll
        for (int j = 0; j < 8; ++j) p.e[j] = from_f32<T>(to_f32(p.e[j]) + to_f32(b[j]) + r[j]);
      } else {
        const long long row = i / inner;
        const long long bt = row / c;
        const float b = to_f32(bias[bt * bias_bs + (row - bt * c)]);
#pragma unroll
        for (int j = 0; j < 8; ++j) p.e[j] = from_f32<T>(to_f32(p.e[j]) + b + r[j]);
      }
      *reinterpret_cast<Pack*>(x + i) = p;
    }
    return;
  }
  for (long long i = first; i < n; i += stride) {
    const long long row = i / inner;
    const long long bt = row / c;
    const float r = res != nullptr ? to_f32(res[i]) : 0.f;
    x[i] = from_f32<T>(to_f32(x[i]) + to_f32(bias[bt * bias_bs + (row - bt * c)]) + r);
  }
}

// ---------------------------------------------------------------------------
// LayerNorm over the last dimension (n <= 2048, n % 8 == 0): one warp per row,
// the row held in registers (16-byte loads), mean then variance in f32.
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void layer_norm(const T* __restrict__ x, const T* __restrict__ gamma,
                                           const T* __restrict__ beta, T* __restrict__ y, long long rows, int n,
                                           float eps) {
  using Pack = Pack8<T>;
  constexpr int kMaxVec = 8;  // 8 vectors of 8 per lane: rows up to 2048
  const int lane = threadIdx.x & 31;
  const long long row = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int nvec = n / 8;
  const T* xr = x + row * n;
  float v[kMaxVec][8];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxVec; ++j) {
    const int vi = j * 32 + lane;
    if (vi < nvec) {
      const Pack p = *reinterpret_cast<const Pack*>(xr + vi * 8);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[j][e] = to_f32(p.e[e]);
        sum += v[j][e];
      }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float mean = sum / n;
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxVec; ++j) {
    if (j * 32 + lane < nvec) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float d = v[j][e] - mean;
        sq += d * d;
      }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
  const float rstd = rsqrtf(sq / n + eps);
  T* yr = y + row * n;
#pragma unroll
  for (int j = 0; j < kMaxVec; ++j) {
    const int vi = j * 32 + lane;
    if (vi < nvec) {
      const Pack g = *reinterpret_cast<const Pack*>(gamma + vi * 8);
      const Pack b = *reinterpret_cast<const Pack*>(beta + vi * 8);
      Pack o;
#pragma unroll
      for (int e = 0; e < 8; ++e) o.e[e] = from_f32<T>((v[j][e] - mean) * rstd * to_f32(g.e[e]) + to_f32(b.e[e]));
      *reinterpret_cast<Pack*>(yr + vi * 8) = o;
    }
  }
}

}  // namespace

#define FLASH_ATTN(NAME, T, WARPS)                                                                               \
  extern "C" __global__ void __launch_bounds__(32 * WARPS)                                                     \
      NAME(const T* q, const T* k, const T* v, T* o, int n_q, int n_kv, long long q_bs, int q_rs, long long k_bs, \
           int k_rs, long long v_bs, int v_rs, long long o_bs, int o_rs, float scale_log2) {                   \
    flash_attn_d64<T, WARPS>(q, k, v, o, n_q, n_kv, q_bs, q_rs, k_bs, k_rs, v_bs, v_rs, o_bs, o_rs, scale_log2); \
  }
FLASH_ATTN(flash_attn_d64_w4_f16, __half, 4)
FLASH_ATTN(flash_attn_d64_w4_bf16, __nv_bfloat16, 4)
FLASH_ATTN(flash_attn_d64_w8_f16, __half, 8)
FLASH_ATTN(flash_attn_d64_w8_bf16, __nv_bfloat16, 8)

#define GROUP_NORM(SUFFIX, T)                                                                                  \
  extern "C" __global__ void group_norm_stats_##SUFFIX(const T* x, const T* pre, long long pre_bs, float* partial, \
                                                       long long group_size, long long chunk, int splits,         \
                                                       int groups, int cpg, long long hw, int vec) {              \
    group_norm_stats<T>(x, pre, pre_bs, partial, group_size, chunk, splits, groups, cpg, hw, vec);                \
  }                                                                                                                \
  extern "C" __global__ void group_norm_apply_##SUFFIX(                                                          \
      const T* x, const T* pre, long long pre_bs, const T* gamma, const T* beta, const float* partial, T* y,       \
      long long group_size, long long chunk, int splits, int groups, int cpg, long long hw, float eps, int silu,   \
      int vec) {                                                                                                   \
    group_norm_apply<T>(x, pre, pre_bs, gamma, beta, partial, y, group_size, chunk, splits, groups, cpg, hw, eps, \
                        silu, vec);                                                                                \
  }
GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
GROUP_NORM(bf16, __nv_bfloat16)

#define GEGLU(SUFFIX, T)                                                                             \
  extern "C" __global__ void geglu_##SUFFIX(const T* h, T* out, long long rows, int inner, int vec) { \
    geglu<T>(h, out, rows, inner, vec);                                                                \
  }
GEGLU(f32, float)
GEGLU(f16, __half)
GEGLU(bf16, __nv_bfloat16)

#define BIAS_ADD(SUFFIX, T)                                                                                       \
  extern "C" __global__ void bias_add_##SUFFIX(T* x, const T* bias, const T* res, long long n, long long inner,   \
                                               int c, long long bias_bs) {                                       \
    bias_add<T>(x, bias, res, n, inner, c, bias_bs);                                                              \
  }
BIAS_ADD(f32, float)
BIAS_ADD(f16, __half)
BIAS_ADD(bf16, __nv_bfloat16)

#define LAYER_NORM(SUFFIX, T)                                                                                     \
  extern "C" __global__ void layer_norm_##SUFFIX(const T* x, const T* gamma, const T* beta, T* y, long long rows, \
                                                 int n, float eps) {                                              \
    layer_norm<T>(x, gamma, beta, y, rows, n, eps);                                                               \
  }
LAYER_NORM(f32, float)
LAYER_NORM(f16, __half)
LAYER_NORM(bf16, __nv_bfloat16)

#define UPSAMPLE2X(SUFFIX, T)                                                                          \
  extern "C" __global__ void upsample_nearest2x_##SUFFIX(const T* x, T* y, long long n, int w) {       \
    upsample_nearest2x<T>(x, y, n, w);                                                                 \
  }
UPSAMPLE2X(f32, float)
UPSAMPLE2X(f16, __half)
UPSAMPLE2X(bf16, __nv_bfloat16)
