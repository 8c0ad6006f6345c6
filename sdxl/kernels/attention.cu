// Flash attention for head dim 64 on mma.sync, compiled to a fatbin by
// sdxl/build.rs and loaded by src/cuda/kernels/attention.rs:
//
//   flash_attn_d64_w{4,8,4m2}_* softmax(q k^T * scale) v, reading q/k/v straight
//                               from the projections' [b, n, heads*64] layout and
//                               writing o in the same layout: no head split/merge
//                               copies, no n×n score matrix in memory.
//
// Accumulation is in f32; results are rounded once to the storage type.

#include "common.cuh"

namespace {

// ---------------------------------------------------------------------------
// Flash attention, head dim 64 (FlashAttention-2's forward pass on mma.sync).
// A block of kWarps warps owns 16 * kMT * kWarps query rows (16 * kMT per
// warp) of one (batch, head) and walks the keys in tiles of 64, double-buffered in shared
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
// kMT: 16-row query tiles per warp. At 2 each B fragment loaded from shared
// memory (ldmatrix) feeds two products instead of one, halving the shared
// memory traffic per product, at the cost of twice the accumulators.
template <typename T, int kWarps, int kMT>
__device__ __forceinline__ void flash_attn_d64(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, T* __restrict__ o, int n_q, int n_kv,
                                               long long q_bs, int q_rs, long long k_bs, int k_rs, long long v_bs,
                                               int v_rs, long long o_bs, int o_rs, float scale_log2) {
  constexpr int kThreads = 32 * kWarps;
  constexpr int kRows = 16 * kMT;  // query rows per warp
  __shared__ __align__(16) T ks[2][kTile][kLd];
  __shared__ __align__(16) T vs[2][kTile][kLd];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
  const int q0 = blockIdx.x * kRows * kWarps, h = blockIdx.y, b = blockIdx.z;
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
  uint32_t qf[kMT][4][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    const int r0 = q0 + warp * kRows + mt * 16 + g, r1 = r0 + 8;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int c = kk * 16 + 2 * t;
      qf[mt][kk][0] = r0 < n_q ? ld_u32(qb + (long long)r0 * q_rs + c) : 0u;
      qf[mt][kk][1] = r1 < n_q ? ld_u32(qb + (long long)r1 * q_rs + c) : 0u;
      qf[mt][kk][2] = r0 < n_q ? ld_u32(qb + (long long)r0 * q_rs + c + 8) : 0u;
      qf[mt][kk][3] = r1 < n_q ? ld_u32(qb + (long long)r1 * q_rs + c + 8) : 0u;
    }
  }
  float acc[kMT][8][4];
  float m0[kMT], m1[kMT];  // running max (log2 domain) of rows g and g+8
  float l0[kMT], l1[kMT];  // this thread's share of the running sums
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
    m0[mt] = m1[mt] = -INFINITY;
    l0[mt] = l1[mt] = 0.f;
  }

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

    float s[kMT][8][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int nt = 0; nt < 8; nt += 2) {
        // B fragments of key tiles nt and nt + 1: lanes 0-7 address keys
        // nt*8.. at dims kk*16.., lanes 8-15 the same keys at kk*16 + 8..,
        // lanes 16-31 the next eight keys likewise
        uint32_t r[4];
        ldmatrix_x4(r, &ks[buf][(nt + (lane >> 4)) * 8 + (lane & 7)][kk * 16 + ((lane >> 3) & 1) * 8]);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Mma<T>::run(s[mt][nt], qf[mt][kk], r[0], r[1]);
          Mma<T>::run(s[mt][nt + 1], qf[mt][kk], r[2], r[3]);
        }
      }
    }
    if ((j + 1) * kTile > n_kv) {  // keys past the end of the sequence
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int key = j * kTile + nt * 8 + 2 * t;
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          if (key >= n_kv) s[mt][nt][0] = s[mt][nt][2] = -INFINITY;
          if (key + 1 >= n_kv) s[mt][nt][1] = s[mt][nt][3] = -INFINITY;
        }
      }
    }

    uint32_t pa[kMT][4][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        mx0 = fmaxf(mx0, fmaxf(s[mt][nt][0], s[mt][nt][1]));
        mx1 = fmaxf(mx1, fmaxf(s[mt][nt][2], s[mt][nt][3]));
      }
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
      }
      const float new0 = fmaxf(m0[mt], mx0 * scale_log2), new1 = fmaxf(m1[mt], mx1 * scale_log2);
      const float c0 = exp2f(m0[mt] - new0), c1 = exp2f(m1[mt] - new1);
      m0[mt] = new0;
      m1[mt] = new1;
      l0[mt] *= c0;
      l1[mt] *= c1;
#pragma unroll
      for (int dt = 0; dt < 8; ++dt) {
        acc[mt][dt][0] *= c0;
        acc[mt][dt][1] *= c0;
        acc[mt][dt][2] *= c1;
        acc[mt][dt][3] *= c1;
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const float p0 = exp2f(s[mt][nt][0] * scale_log2 - new0), p1 = exp2f(s[mt][nt][1] * scale_log2 - new0);
        const float p2 = exp2f(s[mt][nt][2] * scale_log2 - new1), p3 = exp2f(s[mt][nt][3] * scale_log2 - new1);
        l0[mt] += p0 + p1;
        l1[mt] += p2 + p3;
        const int kk = nt >> 1, hi = (nt & 1) * 2;
        pa[mt][kk][hi] = Mma<T>::pack(p0, p1);
        pa[mt][kk][hi + 1] = Mma<T>::pack(p2, p3);
      }
    }

#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int dp = 0; dp < 4; ++dp) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, &vs[buf][kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8][dp * 16 + (lane >> 4) * 8]);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          Mma<T>::run(acc[mt][2 * dp], pa[mt][kk], r[0], r[1]);
          Mma<T>::run(acc[mt][2 * dp + 1], pa[mt][kk], r[2], r[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's copy overwrites the buffer read here
  }

  T* ob = o + b * o_bs + h * kD;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    float s0 = l0[mt], s1 = l1[mt];
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      s0 += __shfl_xor_sync(0xffffffffu, s0, off);
      s1 += __shfl_xor_sync(0xffffffffu, s1, off);
    }
    const float inv0 = 1.f / s0, inv1 = 1.f / s1;
    const int r0 = q0 + warp * kRows + mt * 16 + g, r1 = r0 + 8;
#pragma unroll
    for (int dt = 0; dt < 8; ++dt) {
      const int col = dt * 8 + 2 * t;
      if (r0 < n_q)
        *reinterpret_cast<uint32_t*>(ob + (long long)r0 * o_rs + col) =
            Mma<T>::pack(acc[mt][dt][0] * inv0, acc[mt][dt][1] * inv0);
      if (r1 < n_q)
        *reinterpret_cast<uint32_t*>(ob + (long long)r1 * o_rs + col) =
            Mma<T>::pack(acc[mt][dt][2] * inv1, acc[mt][dt][3] * inv1);
    }
  }
}

}  // namespace

#define FLASH_ATTN(NAME, T, WARPS, MT)                                                                           \
  extern "C" __global__ void __launch_bounds__(32 * WARPS)                                                     \
      NAME(const T* q, const T* k, const T* v, T* o, int n_q, int n_kv, long long q_bs, int q_rs, long long k_bs, \
           int k_rs, long long v_bs, int v_rs, long long o_bs, int o_rs, float scale_log2) {                   \
    flash_attn_d64<T, WARPS, MT>(q, k, v, o, n_q, n_kv, q_bs, q_rs, k_bs, k_rs, v_bs, v_rs, o_bs, o_rs,        \
                                 scale_log2);                                                                  \
  }
FLASH_ATTN(flash_attn_d64_w4_f16, __half, 4, 1)
FLASH_ATTN(flash_attn_d64_w4_bf16, __nv_bfloat16, 4, 1)
FLASH_ATTN(flash_attn_d64_w8_f16, __half, 8, 1)
FLASH_ATTN(flash_attn_d64_w8_bf16, __nv_bfloat16, 8, 1)
FLASH_ATTN(flash_attn_d64_w4m2_f16, __half, 4, 2)
FLASH_ATTN(flash_attn_d64_w4m2_bf16, __nv_bfloat16, 4, 2)
