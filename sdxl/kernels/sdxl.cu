// Fused CUDA kernels for the SDXL pipeline, compiled to a fatbin by
// sdxl/build.rs (nvcc, only with the `cuda` feature) and loaded by
// src/cuda/kernels/ (flash attention is in attention.cu).
//
//   group_norm_stats_* /        GroupNorm (+ optional SiLU) on NCHW in two passes:
//   group_norm_apply_*          shifted sums per chunk, then normalise + affine;
//                               optionally adds the producing convolution's bias first.
//   group_norm_nhwc_*           the same on channels-last [b, h*w, c] storage: per-channel
//                               sums per chunk of pixels, folded per group, then applied.
//   geglu_*                     x * gelu_erf(gate) over the two halves of a row.
//   upsample_nearest2x_*        nearest 2x upsampling, a 2x2 block per input element
//                               (_nhwc_*: of channels-last storage, 8 channels per thread).
//   bias_add_*                  in-place bias (+ residual) add (+ ReLU).
//   layer_norm_*                LayerNorm over the last dimension, one warp per row.
//
// All accumulation is in f32; results are rounded once to the storage type.

#include "common.cuh"

namespace {

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
// GroupNorm on channels-last storage: x is [batch, hw, c] (c % 8 == 0, x and
// y 16-byte aligned), a group is `cpg` neighbouring channels of every pixel.
// The block is (c / 8, rows): thread (tx, ty) owns channels 8tx .. 8tx + 7 and
// visits every rows-th pixel of the block's chunk of `chunk` pixels, so its
// loads are 16 bytes and a warp's are contiguous.
//
// Pass 1 (stats, grid (splits, batch)): per-channel shifted sums in
// registers, the pivot being the group's first element (pixel 0, channel
// g*cpg), then folded through shared memory per group in a fixed order into
// partial[(b, split, g)]. Pass 2 (finalize, grid (groups, batch)): the chunk
// sums of a group, in a fixed order, into its mean and 1/std. Pass 3 (apply,
// grid (splits, batch)): (x - mean) * rstd * gamma + beta (+ SiLU), with the
// same rounding as the NCHW kernels. `pre` as there. Deterministic, and a
// batch item's numbers do not depend on the batch it is in.
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float gn_pre(const T* pre, long long pre_bs, int b, int c) {
  return pre == nullptr ? 0.f : to_f32(pre[b * pre_bs + c]);
}

template <typename T>
__device__ __forceinline__ void group_norm_nhwc_stats(const T* __restrict__ x, const T* __restrict__ pre,
                                                      long long pre_bs, float* __restrict__ partial, long long hw,
                                                      int c, int cpg, int groups, long long chunk, int splits) {
  extern __shared__ float gn_shared[];  // [2][rows][c]
  const int b = blockIdx.y, s = blockIdx.x;
  const int c0 = threadIdx.x * 8, rows = blockDim.y;
  const T* xb = x + b * hw * c;
  float pivot[8], bias[8], s1[8], s2[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int g0 = (c0 + j) / cpg * cpg;
    pivot[j] = gn_in(xb[g0], gn_pre(pre, pre_bs, b, g0));
    bias[j] = gn_pre(pre, pre_bs, b, c0 + j);
    s1[j] = 0.f;
    s2[j] = 0.f;
  }
  const long long start = s * chunk, end = min(start + chunk, hw);
  for (long long p = start + threadIdx.y; p < end; p += rows) {
    const Pack8<T> v = *reinterpret_cast<const Pack8<T>*>(xb + p * c + c0);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float d = gn_in(v.e[j], bias[j]) - pivot[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  }
  float* sh1 = gn_shared;
  float* sh2 = gn_shared + rows * c;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    sh1[threadIdx.y * c + c0 + j] = s1[j];
    sh2[threadIdx.y * c + c0 + j] = s2[j];
  }
  __syncthreads();
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int g = tid; g < groups; g += blockDim.x * blockDim.y) {
    float a1 = 0.f, a2 = 0.f;
    for (int r = 0; r < rows; ++r) {
      for (int k = g * cpg; k < (g + 1) * cpg; ++k) {
        a1 += sh1[r * c + k];
        a2 += sh2[r * c + k];
      }
    }
    float* out = partial + ((b * (long long)splits + s) * groups + g) * 2;
    out[0] = a1;
    out[1] = a2;
  }
}

template <typename T>
__device__ __forceinline__ void group_norm_nhwc_finalize(const T* __restrict__ x, const T* __restrict__ pre,
                                                         long long pre_bs, const float* __restrict__ partial,
                                                         float* __restrict__ stats, long long hw, int c, int cpg,
                                                         int groups, int splits, float eps) {
  const int g = blockIdx.x, b = blockIdx.y;
  float s1 = 0.f, s2 = 0.f;
  for (int i = threadIdx.x; i < splits; i += blockDim.x) {
    const float* p = partial + ((b * (long long)splits + i) * groups + g) * 2;
    s1 += p[0];
    s2 += p[1];
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    const float n = (float)(hw * cpg);
    const float dmean = s1 / n;
    const float var = fmaxf(s2 / n - dmean * dmean, 0.f);
    const int g0 = g * cpg;
    stats[(b * groups + g) * 2] = gn_in(x[b * hw * c + g0], gn_pre(pre, pre_bs, b, g0)) + dmean;
    stats[(b * groups + g) * 2 + 1] = rsqrtf(var + eps);
  }
}

template <typename T>
__device__ __forceinline__ void group_norm_nhwc_apply(const T* __restrict__ x, const T* __restrict__ pre,
                                                      long long pre_bs, const T* __restrict__ gamma,
                                                      const T* __restrict__ beta, const float* __restrict__ stats,
                                                      T* __restrict__ y, long long hw, int c, int cpg, int groups,
                                                      long long chunk, int silu) {
  const int b = blockIdx.y, s = blockIdx.x;
  const int c0 = threadIdx.x * 8;
  float mean[8], sc[8], sh[8], bias[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int g = (c0 + j) / cpg;
    mean[j] = stats[(b * groups + g) * 2];
    sc[j] = stats[(b * groups + g) * 2 + 1] * to_f32(gamma[c0 + j]);
    sh[j] = to_f32(beta[c0 + j]);
    bias[j] = gn_pre(pre, pre_bs, b, c0 + j);
  }
  const T* xb = x + b * hw * c;
  T* yb = y + b * hw * c;
  const long long start = s * chunk, end = min(start + chunk, hw);
  for (long long p = start + threadIdx.y; p < end; p += blockDim.y) {
    const Pack8<T> v = *reinterpret_cast<const Pack8<T>*>(xb + p * c + c0);
    Pack8<T> o;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float r = (gn_in(v.e[j], bias[j]) - mean[j]) * sc[j] + sh[j];
      if (silu) r = r / (1.f + __expf(-r));
      o.e[j] = from_f32<T>(r);
    }
    *reinterpret_cast<Pack8<T>*>(yb + p * c + c0) = o;
  }
}

// ---------------------------------------------------------------------------
// GEGLU: h is [rows, 2*inner]; out[r, c] = h[r, c] * gelu_erf(h[r, inner + c]).
// `vec`: inner is a multiple of 8 and h, out start 16-byte aligned: 8 outputs
// per thread from two 16-byte loads.
// ---------------------------------------------------------------------------

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

// Nearest 2x upsampling of channels-last [batch, h, w, c] (c % 8 == 0, 16-byte
// aligned) into [batch, 2h, 2w, c]: a thread per 8 channels of an input pixel
// writes them to the four output pixels it covers.
template <typename T>
__device__ __forceinline__ void upsample_nearest2x_nhwc(const T* __restrict__ x, T* __restrict__ y, long long nv,
                                                        int w, int cv) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < nv; v += stride) {
    const long long pix = v / cv;
    const int k = (int)(v - pix * cv);
    const int j = (int)(pix % w);
    const long long bi = pix / w;  // batch * h + i
    const Pack8<T> p = *reinterpret_cast<const Pack8<T>*>(x + v * 8);
    const long long c = cv * 8LL;
    T* out = y + ((2 * bi) * 2LL * w + 2LL * j) * c + k * 8;
    *reinterpret_cast<Pack8<T>*>(out) = p;
    *reinterpret_cast<Pack8<T>*>(out + c) = p;
    *reinterpret_cast<Pack8<T>*>(out + 2LL * w * c) = p;
    *reinterpret_cast<Pack8<T>*>(out + 2LL * w * c + c) = p;
  }
}

// Two channels-last images side by side on the channels (torch.cat(dim=1)):
// a [pixels, ca] and b [pixels, cb] (ca, cb % 8 == 0, 16-byte aligned) into
// y [pixels, ca + cb], a thread per 8 output channels of a pixel, so every
// load and store is 16 bytes (candle's cat copies 2 bytes a thread).
template <typename T>
__device__ __forceinline__ void cat_channels_nhwc(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                                                  long long nv, int av, int bv) {
  const int cv = av + bv;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < nv; v += stride) {
    const long long pix = v / cv;
    const int k = (int)(v - pix * cv);
    const T* src = k < av ? a + (pix * av + k) * 8 : b + (pix * bv + (k - av)) * 8;
    *reinterpret_cast<Pack8<T>*>(y + v * 8) = *reinterpret_cast<const Pack8<T>*>(src);
  }
}

// ---------------------------------------------------------------------------
// In-place bias add: x[i] += bias[batch * bias_bs + channel] (+ res[i] when
// res is not null: a residual connection in the same pass), where x is
// contiguous [batch, c, inner] (inner = 1 for a Linear's [rows, c] output or
// channels-last [pixels, c] storage, inner = h*w for NCHW; bias_bs = c for a
// per-sample bias such as the UNet's time embedding, 0 for a shared one).
// `rps` rows of c share one sample's bias (h*w for channels-last storage, 1
// otherwise). `relu`: max(0, sum) is stored (TAESD's blocks). Eight
// elements per step when they share one channel (inner % 8 == 0) or are
// eight channels (inner == 1).
// ---------------------------------------------------------------------------

__device__ __forceinline__ float relu_if(float v, int relu) { return relu ? fmaxf(v, 0.f) : v; }

template <typename T>
__device__ __forceinline__ void bias_add(T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ res,
                                         long long n, long long inner, int c, long long bias_bs, long long rps, int relu) {
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
        const T* b = bias + (bt / rps) * bias_bs + ch;
#pragma unroll
        for (int j = 0; j < 8; ++j) p.e[j] = from_f32<T>(relu_if(to_f32(p.e[j]) + to_f32(b[j]) + r[j], relu));
      } else {
        const long long row = i / inner;
        const long long bt = row / c;
        const float b = to_f32(bias[(bt / rps) * bias_bs + (row - bt * c)]);
#pragma unroll
        for (int j = 0; j < 8; ++j) p.e[j] = from_f32<T>(relu_if(to_f32(p.e[j]) + b + r[j], relu));
      }
      *reinterpret_cast<Pack*>(x + i) = p;
    }
    return;
  }
  for (long long i = first; i < n; i += stride) {
    const long long row = i / inner;
    const long long bt = row / c;
    const float r = res != nullptr ? to_f32(res[i]) : 0.f;
    x[i] = from_f32<T>(relu_if(to_f32(x[i]) + to_f32(bias[(bt / rps) * bias_bs + (row - bt * c)]) + r, relu));
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
  const int lane = threadIdx.x & 31;
  const long long row = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int nvec = n / 8;
  float v[kLayerNormMaxVec][8];
  float mean, rstd;
  layer_norm_row<T>(x + row * n, lane, n, eps, v, mean, rstd);
  T* yr = y + row * n;
#pragma unroll
  for (int j = 0; j < kLayerNormMaxVec; ++j) {
    const int vi = j * 32 + lane;
    if (vi < nvec) {
      const Pack g = *reinterpret_cast<const Pack*>(gamma + vi * 8);
      const Pack b = *reinterpret_cast<const Pack*>(beta + vi * 8);
      Pack o;
#pragma unroll
      for (int e = 0; e < 8; ++e) o.e[e] = layer_norm1<T>(v[j][e], mean, rstd, g.e[e], b.e[e]);
      *reinterpret_cast<Pack*>(yr + vi * 8) = o;
    }
  }
}

}  // namespace

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

#define GROUP_NORM_NHWC(SUFFIX, T)                                                                                 \
  extern "C" __global__ void group_norm_nhwc_stats_##SUFFIX(const T* x, const T* pre, long long pre_bs,            \
                                                            float* partial, long long hw, int c, int cpg,          \
                                                            int groups, long long chunk, int splits) {             \
    group_norm_nhwc_stats<T>(x, pre, pre_bs, partial, hw, c, cpg, groups, chunk, splits);                          \
  }                                                                                                                \
  extern "C" __global__ void group_norm_nhwc_finalize_##SUFFIX(const T* x, const T* pre, long long pre_bs,         \
                                                               const float* partial, float* stats, long long hw,   \
                                                               int c, int cpg, int groups, int splits, float eps) {\
    group_norm_nhwc_finalize<T>(x, pre, pre_bs, partial, stats, hw, c, cpg, groups, splits, eps);                 \
  }                                                                                                                \
  extern "C" __global__ void group_norm_nhwc_apply_##SUFFIX(const T* x, const T* pre, long long pre_bs,            \
                                                            const T* gamma, const T* beta, const float* stats,     \
                                                            T* y, long long hw, int c, int cpg, int groups,        \
                                                            long long chunk, int silu) {                           \
    group_norm_nhwc_apply<T>(x, pre, pre_bs, gamma, beta, stats, y, hw, c, cpg, groups, chunk, silu);             \
  }
GROUP_NORM_NHWC(f32, float)
GROUP_NORM_NHWC(f16, __half)
GROUP_NORM_NHWC(bf16, __nv_bfloat16)

#define GEGLU(SUFFIX, T)                                                                             \
  extern "C" __global__ void geglu_##SUFFIX(const T* h, T* out, long long rows, int inner, int vec) { \
    geglu<T>(h, out, rows, inner, vec);                                                                \
  }
GEGLU(f32, float)
GEGLU(f16, __half)
GEGLU(bf16, __nv_bfloat16)

#define BIAS_ADD(SUFFIX, T)                                                                                       \
  extern "C" __global__ void bias_add_##SUFFIX(T* x, const T* bias, const T* res, long long n, long long inner,   \
                                               int c, long long bias_bs, long long rps, int relu) {              \
    bias_add<T>(x, bias, res, n, inner, c, bias_bs, rps, relu);                                                   \
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

#define UPSAMPLE2X_NHWC(SUFFIX, T)                                                                            \
  extern "C" __global__ void upsample_nearest2x_nhwc_##SUFFIX(const T* x, T* y, long long nv, int w, int cv) { \
    upsample_nearest2x_nhwc<T>(x, y, nv, w, cv);                                                              \
  }
UPSAMPLE2X_NHWC(f32, float)
UPSAMPLE2X_NHWC(f16, __half)
UPSAMPLE2X_NHWC(bf16, __nv_bfloat16)

#define CAT_CHANNELS_NHWC(SUFFIX, T)                                                                    \
  extern "C" __global__ void cat_channels_nhwc_##SUFFIX(const T* a, const T* b, T* y, long long nv, int av, \
                                                        int bv) {                                      \
    cat_channels_nhwc<T>(a, b, y, nv, av, bv);                                                          \
  }
CAT_CHANNELS_NHWC(f32, float)
CAT_CHANNELS_NHWC(f16, __half)
CAT_CHANNELS_NHWC(bf16, __nv_bfloat16)
