// Flash attention for head dim 64 on Hopper's warpgroup MMA (wgmma), compiled
// by sdxl/build.rs for sm_90a only (the `a` features are what wgmma needs; no
// PTX fallback can carry them) and loaded by src/cuda/kernels/attention.rs on
// compute capability 9.0:
//
//   flash_wgmma_d64_g{G}n{K}_*  softmax(q k^T * scale) v with the arguments and
//                               layouts of attention.cu's kernels: G warpgroups
//                               of 64 query rows, tiles of K keys.
//   flash_wgmma_d64_g{G}n{K}p_* the same, with both products in flight during
//                               the softmax (FlashAttention-3's order)
//   flash_wgmma_d64_ws{G}n{K}_* the same, warp-specialized: a producer warp
//                               copies K/V for G consumer warpgroups.
//
// Built for another architecture, the kernels are stubs the host never calls.
//
// How it differs from attention.cu's mma.sync kernel (FlashAttention-3's
// ideas, without TMA):
// - Each warpgroup (4 warps, 128 threads) owns 64 query rows; a block of
//   kGroups warpgroups shares each K/V tile of 64 or 128 keys in shared memory.
// - K and V are stored with the 128-byte swizzle wgmma reads them in, and
//   feed the tensor cores straight from shared memory through descriptors:
//   no ldmatrix, no B fragments in registers. Q and P stay in registers as
//   the A operand (P's layout is the score accumulators', as on mma.sync).
// - The products are asynchronous: while the tensor cores compute the next
//   tile's scores q k^T, the warps run this tile's softmax (exp2 on the SFU),
//   then issue p v. Three K/V stages: the tile in p v, the tile in q k^T,
//   and the tile being copied.
//
// Accumulation is in f32; results are rounded once to the storage type.

#include "flash.cuh"

namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int kStages = 3;

// Element offset of row r, 16-byte chunk c of a tile stored with the 128-byte
// swizzle: within each 1024-byte group of 8 rows, chunk c of row r sits at
// chunk c ^ (r % 8).
__device__ __forceinline__ int swizzled(int r, int c) { return r * kD + ((c ^ (r & 7)) << 3); }

// A shared-memory matrix descriptor for a tile laid out as above, starting at
// byte address addr: leading byte offset unused (1), stride byte offset 1024
// (from one group of 8 rows to the next), 128-byte swizzle. The same layout
// serves K as a K-major B operand (rows are keys, the 64 dims contiguous) and
// V as an MN-major one (rows are keys, the 64 output dims contiguous).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's completed cp.async writes visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accesses to accumulators across a wgmma.
template <int kN> __device__ __forceinline__ void fence_regs(float (&d)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
}

// wgmma with A from registers and B from shared memory, f32 accumulators:
// d (64 x N) = a (64 x 16) * b (16 x N) + (kScaleD ? d : 0), b transposed
// (MN-major) with kTransB. The operand lists are spelled out once here, for
// N = 64 (32 accumulators a thread) and N = 128 (64).
#define D4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define D_N64 D4(0), D4(1), D4(2), D4(3), D4(4), D4(5), D4(6), D4(7)
#define D_N128 D_N64, D4(8), D4(9), D4(10), D4(11), D4(12), D4(13), D4(14), D4(15)
#define REGS_N64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define REGS_N128 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define A_B_OPS "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(kScaleD), "n"(kTransB)
#define WGMMA_TYPE(T, PTX)                                                                                    \
  template <> struct Wgmma<T> {                                                                              \
    template <int kScaleD, int kTransB>                                                                      \
    static __device__ __forceinline__ void m64n64k16(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {  \
      asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " " REGS_N64                     \
                   ", {%32, %33, %34, %35}, %36, %37, 1, 1, %38;\n"                                          \
                   : D_N64                                                                                    \
                   : A_B_OPS);                                                                                \
    }                                                                                                         \
    template <int kScaleD, int kTransB>                                                                      \
    static __device__ __forceinline__ void m64n128k16(float (&d)[16][4], const uint32_t (&a)[4], uint64_t b) { \
      asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " " REGS_N128                   \
                   ", {%64, %65, %66, %67}, %68, %69, 1, 1, %70;\n"                                          \
                   : D_N128                                                                                   \
                   : A_B_OPS);                                                                                \
    }                                                                                                         \
  };

template <typename T> struct Wgmma;
WGMMA_TYPE(__half, "f16")
WGMMA_TYPE(__nv_bfloat16, "bf16")

// s = q k^T for one tile of kN * 8 keys: four k16 slices of the head dim,
// each 32 bytes further along K's swizzled rows.
template <typename T, int kN>
__device__ __forceinline__ void scores(float (&s)[kN][4], const uint32_t (&qf)[4][4], const T* ks) {
  const uint32_t base = smem_addr(ks);
  if constexpr (kN == 8) {
    Wgmma<T>::template m64n64k16<0, 0>(s, qf[0], sw128_desc(base));
#pragma unroll
    for (int kk = 1; kk < 4; ++kk) Wgmma<T>::template m64n64k16<1, 0>(s, qf[kk], sw128_desc(base + kk * 32));
  } else {
    static_assert(kN == 16, "64 or 128 keys per tile");
    Wgmma<T>::template m64n128k16<0, 0>(s, qf[0], sw128_desc(base));
#pragma unroll
    for (int kk = 1; kk < 4; ++kk) Wgmma<T>::template m64n128k16<1, 0>(s, qf[kk], sw128_desc(base + kk * 32));
  }
}

// acc += p v for one tile: k16 slices of the keys, each 16 rows (2048 bytes)
// further along V; V is the transposed (MN-major) operand.
template <typename T, int kN>
__device__ __forceinline__ void accumulate(float (&acc)[8][4], const uint32_t (&pa)[kN / 2][4], const T* vs) {
  const uint32_t base = smem_addr(vs);
#pragma unroll
  for (int kk = 0; kk < kN / 2; ++kk) Wgmma<T>::template m64n64k16<1, 1>(acc, pa[kk], sw128_desc(base + kk * 2048));
}

// One tile's softmax (keys from k0 on) and its p v, waited for: the scores
// s become P in registers, the accumulators are rescaled and then accumulate
// p v from the tile's V stage vs.
template <typename T, int kN>
__device__ __forceinline__ void softmax_and_accumulate(float (&s)[kN][4], int k0, int n_kv, int t, float scale_log2,
                                                       float& m0, float& m1, float& l0, float& l1,
                                                       float (&acc)[8][4], const T* vs) {
  uint32_t pa[kN / 2][4];
  mask_tail(s, k0, n_kv, t);
  online_softmax<T, kN>(s, m0, m1, l0, l1, acc, pa, scale_log2);
  fence_regs(acc);
  wgmma_fence();
  accumulate<T, kN>(acc, pa, vs);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(acc);
}

// The next tile's scores, computed while this tile's softmax ran, become
// the current ones (once their wgmma has been waited for).
template <int kN> __device__ __forceinline__ void take_scores(float (&s)[kN][4], float (&sn)[kN][4]) {
  fence_regs(sn);
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[i][e] = sn[i][e];
}

// The shared memory a block of kKeys-key tiles needs: kStages K and V tiles,
// and 1024 bytes of slack to align them to the swizzle's 1024-byte pattern.
template <typename T, int kKeys>
__host__ __device__ constexpr int smem_bytes() {
  return 2 * kStages * kKeys * kD * static_cast<int>(sizeof(T)) + 1024;
}

// kPipelined: FlashAttention-3's order within a warpgroup. Tile j's p v is
// issued right after tile j + 1's q k^T, and tile j + 1's softmax runs while
// both are in flight; the accumulators' rescale for tile j + 1 waits until
// tile j's p v is done, just before tile j + 1's p v. Without it, p v is
// issued after the softmax and waited for at once, and the tensor cores
// idle meanwhile unless another block's warps fill in.
template <typename T, int kGroups, int kKeys, bool kPipelined>
__device__ __forceinline__ void flash_wgmma_d64(const T* __restrict__ q, const T* __restrict__ k,
                                                const T* __restrict__ v, T* __restrict__ o, int n_q, int n_kv,
                                                long long q_bs, int q_rs, long long k_bs, int k_rs, long long v_bs,
                                                int v_rs, long long o_bs, int o_rs, float scale_log2) {
  constexpr int kThreads = 128 * kGroups;
  constexpr int kN = kKeys / 8;                // 8-key chunks per tile
  constexpr int kTileElems = kKeys * kD;       // one K or V tile: kKeys rows of 128 bytes
  static_assert(smem_bytes<T, kKeys>() <= 227 * 1024, "more shared memory than a block can have");
  extern __shared__ uint8_t smem_raw[];
  T* const ks = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  T* const vs = ks + kStages * kTileElems;

  const int tid = threadIdx.x, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;  // fragment coordinates
  // warp w of warpgroup wg owns rows 16 w .. 16 w + 15 of the group's 64
  const int q0 = blockIdx.x * 64 * kGroups + (tid >> 5) * 16, h = blockIdx.y, b = blockIdx.z;
  const T* qb = q + b * q_bs + h * kD;
  const T* kb = k + b * k_bs + h * kD;
  const T* vb = v + b * v_bs + h * kD;

  auto load_kv = [&](int tile) {
    const int k0 = tile * kKeys, st = (tile % kStages) * kTileElems;
#pragma unroll
    for (int i = tid; i < kKeys * 8; i += kThreads) {
      const int r = i >> 3, c = i & 7;
      const bool ok = k0 + r < n_kv;
      const long long row = ok ? k0 + r : 0;
      cp_async_16(&ks[st + swizzled(r, c)], kb + row * k_rs + c * 8, ok);
      cp_async_16(&vs[st + swizzled(r, c)], vb + row * v_rs + c * 8, ok);
    }
  };
  const int tiles = (n_kv + kKeys - 1) / kKeys;
  load_kv(0);
  cp_async_commit();
  if (tiles > 1) load_kv(1);
  cp_async_commit();

  uint32_t qf[4][4];
  load_q(qf, qb, q0, n_q, q_rs, g, t);
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY;  // running max (log2 domain) of rows g and g+8
  float l0 = 0.f, l1 = 0.f;              // this thread's share of the running sums

  float s[kN][4], sn[kN][4];
  cp_async_wait<1>();  // tile 0 landed (tile 1 may still be in flight)
  fence_proxy_async();
  __syncthreads();
  wgmma_fence();
  scores<T, kN>(s, qf, ks);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(s);

  // tile j + 1 landed, and every warpgroup is done with tile j - 1, whose
  // stage the copy of tile j + 2 reuses; then tile j + 1's q k^T is issued
  auto next_scores = [&](int j) {
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    if (j + 2 < tiles) load_kv(j + 2);
    cp_async_commit();
    fence_regs(sn);
    wgmma_fence();
    scores<T, kN>(sn, qf, ks + ((j + 1) % kStages) * kTileElems);
    wgmma_commit();
  };

  if constexpr (kPipelined) {
    uint32_t pa[kN / 2][4];  // tile j's p, read by its p v
    float c0, c1;            // the accumulators' rescale before tile j's p v
    mask_tail(s, 0, n_kv, t);
    softmax_exp(s, s, m0, m1, l0, l1, scale_log2, c0, c1);
    pack_p<T, kN>(s, pa);
    for (int j = 0; j < tiles; ++j) {
      const bool next = j + 1 < tiles;
      rescale(acc, c0, c1);
      fence_regs(acc);
      if (next) next_scores(j);
      wgmma_fence();
      accumulate<T, kN>(acc, pa, vs + (j % kStages) * kTileElems);
      wgmma_commit();
      if (next) {
        // tile j + 1's scores (p v, committed after, may run on); p goes to
        // s: registers a wgmma in flight writes or reads (sn, acc, pa) are
        // not written meanwhile, or ptxas serializes the wgmmas
        wgmma_wait<1>();
        const int k1 = (j + 1) * kKeys;
        if (k1 + kKeys <= n_kv) {
          softmax_exp(sn, s, m0, m1, l0, l1, scale_log2, c0, c1);
        } else {  // the last tile, past n_kv: masked on the way
          take_scores(s, sn);
          mask_tail(s, k1, n_kv, t);
          softmax_exp(s, s, m0, m1, l0, l1, scale_log2, c0, c1);
        }
        wgmma_wait<0>();
        fence_regs(acc);
        pack_p<T, kN>(s, pa);
      } else {
        wgmma_wait<0>();
        fence_regs(acc);
      }
    }
  } else {
    for (int j = 0; j < tiles; ++j) {
      const bool next = j + 1 < tiles;
      if (next) next_scores(j);
      softmax_and_accumulate<T, kN>(s, j * kKeys, n_kv, t, scale_log2, m0, m1, l0, l1, acc,
                                    vs + (j % kStages) * kTileElems);
      if (next) take_scores(s, sn);
    }
  }

  store_rows(o + b * o_bs + h * kD, o_rs, q0, n_q, acc, l0, l1, g, t);
}

// --- Warp-specialized variant ----------------------------------------------
// Above, every thread copies its share of each K/V tile and a __syncthreads
// per tile keeps the warpgroups of a block in lockstep: they all run their
// softmax at the same time and leave the tensor cores idle meanwhile, so more
// warpgroups per block (less K/V traffic from L2) bought nothing. Here one
// extra producer warp copies the tiles into kWsStages stages, and barriers in
// shared memory (mbarrier) replace __syncthreads: a stage's "full" barrier
// completes when the producer's copies into it have landed, its "empty"
// barrier when every consumer warp is done reading it. The warpgroups then
// drift apart, and one's softmax runs while another's products do.

constexpr int kWsStages = 4;

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Arrives on bar once every cp.async this thread issued before has landed.
__device__ __forceinline__ void mbar_arrive_cp_async(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Waits until the barrier's phase of this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// The warp-specialized kernel's dynamic shared memory: kWsStages K and V
// tiles, their full and empty barriers, and the alignment slack.
template <typename T, int kKeys>
__host__ __device__ constexpr int ws_smem_bytes() {
  return 2 * kWsStages * kKeys * kD * static_cast<int>(sizeof(T)) + 2 * kWsStages * 8 + 1024;
}

// kOverlap: issue the next tile's q k^T before this tile's softmax, as the
// kernel above does (two score accumulators: 253 registers at 128 keys, too
// many beside a producer warp), or leave the overlap to the other warpgroups.
template <typename T, int kGroups, int kKeys, bool kOverlap>
__device__ __forceinline__ void flash_wgmma_ws_d64(const T* __restrict__ q, const T* __restrict__ k,
                                                   const T* __restrict__ v, T* __restrict__ o, int n_q, int n_kv,
                                                   long long q_bs, int q_rs, long long k_bs, int k_rs,
                                                   long long v_bs, int v_rs, long long o_bs, int o_rs,
                                                   float scale_log2) {
  constexpr int kN = kKeys / 8;
  constexpr int kTileElems = kKeys * kD;
  constexpr int kConsumerWarps = 4 * kGroups;
  static_assert(ws_smem_bytes<T, kKeys>() <= 227 * 1024, "more shared memory than a block can have");
  extern __shared__ uint8_t smem_raw[];
  T* const ks = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  T* const vs = ks + kWsStages * kTileElems;
  uint64_t* const full = reinterpret_cast<uint64_t*>(vs + kWsStages * kTileElems);
  uint64_t* const empty = full + kWsStages;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int h = blockIdx.y, b = blockIdx.z;
  const int tiles = (n_kv + kKeys - 1) / kKeys;
  if (tid == 0) {
#pragma unroll
    for (int st = 0; st < kWsStages; ++st) {
      mbar_init(&full[st], 32);
      mbar_init(&empty[st], kConsumerWarps);
    }
  }
  __syncthreads();

  if (warp == kConsumerWarps) {  // the producer
    const T* kb = k + b * k_bs + h * kD;
    const T* vb = v + b * v_bs + h * kD;
    for (int j = 0; j < tiles; ++j) {
      const int st = j % kWsStages, use = j / kWsStages;
      if (use > 0) mbar_wait(&empty[st], (use - 1) & 1);
      const int k0 = j * kKeys;
#pragma unroll 4
      for (int i = lane; i < kKeys * 8; i += 32) {
        const int r = i >> 3, c = i & 7;
        const bool ok = k0 + r < n_kv;
        const long long row = ok ? k0 + r : 0;
        cp_async_16(&ks[st * kTileElems + swizzled(r, c)], kb + row * k_rs + c * 8, ok);
        cp_async_16(&vs[st * kTileElems + swizzled(r, c)], vb + row * v_rs + c * 8, ok);
      }
      mbar_arrive_cp_async(&full[st]);
    }
    cp_async_wait<0>();
    return;
  }

  const int g = lane >> 2, t = lane & 3;
  const int q0 = blockIdx.x * 64 * kGroups + warp * 16;
  uint32_t qf[4][4];
  load_q(qf, q + b * q_bs + h * kD, q0, n_q, q_rs, g, t);
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY;
  float l0 = 0.f, l1 = 0.f;

  // q k^T of tile j, once its stage is full
  auto issue_scores = [&](float (&dst)[kN][4], int j) {
    mbar_wait(&full[j % kWsStages], (j / kWsStages) & 1);
    fence_proxy_async();  // the producer's copies, seen by this warp's wgmma
    fence_regs(dst);
    wgmma_fence();
    scores<T, kN>(dst, qf, ks + (j % kWsStages) * kTileElems);
    wgmma_commit();
  };

  float s[kN][4];
  issue_scores(s, 0);
  wgmma_wait<0>();
  fence_regs(s);
  for (int j = 0; j < tiles; ++j) {
    const bool next = j + 1 < tiles;
    [[maybe_unused]] float sn[kOverlap ? kN : 1][4];
    if constexpr (kOverlap) {
      if (next) issue_scores(sn, j + 1);
    }
    softmax_and_accumulate<T, kN>(s, j * kKeys, n_kv, t, scale_log2, m0, m1, l0, l1, acc,
                                  vs + (j % kWsStages) * kTileElems);
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[j % kWsStages]);  // this warp is done with tile j
    if (next) {
      if constexpr (kOverlap) {
        take_scores(s, sn);
      } else {
        issue_scores(s, j + 1);
        wgmma_wait<0>();
        fence_regs(s);
      }
    }
  }

  store_rows(o + b * o_bs + h * kD, o_rs, q0, n_q, acc, l0, l1, g, t);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLASH_WGMMA_BODY(T, GROUPS, KEYS, PIPELINED)                                                           \
  flash_wgmma_d64<T, GROUPS, KEYS, PIPELINED>(q, k, v, o, n_q, n_kv, q_bs, q_rs, k_bs, k_rs, v_bs, v_rs, o_bs,  \
                                              o_rs, scale_log2);
#else
#define FLASH_WGMMA_BODY(T, GROUPS, KEYS, PIPELINED) __trap();
#endif

// flash_wgmma_d64_g{GROUPS}n{KEYS}[p]_{f16,bf16}: GROUPS warpgroups of 64 query
// rows, tiles of KEYS keys, with p the pipelined order (kPipelined above);
// dynamic shared memory of 2 * 3 * KEYS * 128 + 1024 bytes (the host sets the
// attribute above 48 KB).
#define FLASH_WGMMA(NAME, GROUPS, KEYS, PIPELINED)                                                               \
  extern "C" __global__ void __launch_bounds__(128 * GROUPS) NAME##_f16(                                       \
      const __half* q, const __half* k, const __half* v, __half* o, int n_q, int n_kv, long long q_bs, int q_rs, \
      long long k_bs, int k_rs, long long v_bs, int v_rs, long long o_bs, int o_rs, float scale_log2) {         \
    FLASH_WGMMA_BODY(__half, GROUPS, KEYS, PIPELINED)                                                           \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(128 * GROUPS) NAME##_bf16(                                      \
      const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o, int n_q,         \
      int n_kv, long long q_bs, int q_rs, long long k_bs, int k_rs, long long v_bs, int v_rs, long long o_bs,      \
      int o_rs, float scale_log2) {                                                                             \
    FLASH_WGMMA_BODY(__nv_bfloat16, GROUPS, KEYS, PIPELINED)                                                    \
  }
FLASH_WGMMA(flash_wgmma_d64_g1n64, 1, 64, false)
FLASH_WGMMA(flash_wgmma_d64_g2n64, 2, 64, false)
FLASH_WGMMA(flash_wgmma_d64_g3n64, 3, 64, false)
FLASH_WGMMA(flash_wgmma_d64_g1n128, 1, 128, false)
FLASH_WGMMA(flash_wgmma_d64_g2n128, 2, 128, false)
FLASH_WGMMA(flash_wgmma_d64_g1n64p, 1, 64, true)
FLASH_WGMMA(flash_wgmma_d64_g2n64p, 2, 64, true)
FLASH_WGMMA(flash_wgmma_d64_g1n128p, 1, 128, true)
FLASH_WGMMA(flash_wgmma_d64_g2n128p, 2, 128, true)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLASH_WS_BODY(T, GROUPS, KEYS, OVERLAP)                                                                \
  flash_wgmma_ws_d64<T, GROUPS, KEYS, OVERLAP>(q, k, v, o, n_q, n_kv, q_bs, q_rs, k_bs, k_rs, v_bs, v_rs, o_bs, \
                                               o_rs, scale_log2);
#else
#define FLASH_WS_BODY(T, GROUPS, KEYS, OVERLAP) __trap();
#endif

// flash_wgmma_d64_ws{GROUPS}n{KEYS}_{f16,bf16}: the warp-specialized kernel,
// GROUPS consumer warpgroups and a producer warp. Where the registers allow
// (2 warpgroups, 64 keys: 165 a thread) each warpgroup also overlaps its next
// q k^T with its softmax; 3 warpgroups or 128 keys leave that to the others
// (3 warpgroups of 128 keys would spill).
#define FLASH_WS(NAME, GROUPS, KEYS, OVERLAP)                                                                    \
  extern "C" __global__ void __launch_bounds__(128 * GROUPS + 32) NAME##_f16(                                  \
      const __half* q, const __half* k, const __half* v, __half* o, int n_q, int n_kv, long long q_bs, int q_rs, \
      long long k_bs, int k_rs, long long v_bs, int v_rs, long long o_bs, int o_rs, float scale_log2) {         \
    FLASH_WS_BODY(__half, GROUPS, KEYS, OVERLAP)                                                                \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(128 * GROUPS + 32) NAME##_bf16(                                 \
      const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, __nv_bfloat16* o, int n_q,         \
      int n_kv, long long q_bs, int q_rs, long long k_bs, int k_rs, long long v_bs, int v_rs, long long o_bs,      \
      int o_rs, float scale_log2) {                                                                             \
    FLASH_WS_BODY(__nv_bfloat16, GROUPS, KEYS, OVERLAP)                                                         \
  }
FLASH_WS(flash_wgmma_d64_ws2n64, 2, 64, true)
FLASH_WS(flash_wgmma_d64_ws2n128, 2, 128, false)
FLASH_WS(flash_wgmma_d64_ws3n64, 3, 64, false)
