// Flash attention for head dim 64 on mma.sync, compiled to a fatbin by
// sdxl/build.rs and loaded by src/cuda/kernels/attention.rs:
//
//   flash_attn_d64_w{4,8,4m2}_* softmax(q k^T * scale) v, reading q/k/v straight
//                               from the projections' [b, n, heads*64] layout and
//                               writing o in the same layout: no head split/merge
//                               copies, no n×n score matrix in memory.
//
// Accumulation is in f32; results are rounded once to the storage type.

#include "flash.cuh"

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

constexpr int kTile = 64;     // keys per tile
constexpr int kLd = kD + 8;  // padded smem row (144 B): conflict-free fragment loads

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
};
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

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
  const int q0 = blockIdx.x * kRows * kWarps + warp * kRows, h = blockIdx.y, b = blockIdx.z;
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
  for (int mt = 0; mt < kMT; ++mt) load_q(qf[mt], qb, q0 + mt * 16, n_q, q_rs, g, t);
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

    uint32_t pa[kMT][4][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      mask_tail(s[mt], j * kTile, n_kv, t);
      online_softmax<T, 8>(s[mt], m0[mt], m1[mt], l0[mt], l1[mt], acc[mt], pa[mt], scale_log2);
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
  for (int mt = 0; mt < kMT; ++mt) store_rows(ob, o_rs, q0 + mt * 16, n_q, acc[mt], l0[mt], l1[mt], g, t);
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
