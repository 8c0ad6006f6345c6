// FP8 (e4m3) helpers for the UNet's linear layers on Hopper's FP8 tensor
// cores, compiled by sdxl/build.rs next to sdxl.cu and loaded by
// src/cuda/fp8.rs. The products themselves run in cuBLASLt (src/cuda/gemm.rs).
//
//   quant_rows_e4m3_{f16,bf16}   one scale per row: s = amax(row) / 448 and
//                                q = e4m3(x / s), saturating. For weights
//                                [out, in] that is a scale per output channel,
//                                for activations [tokens, in] one per token.
//   layer_norm_e4m3_{f16,bf16}   LayerNorm of each row (layer_norm_* in sdxl.cu,
//                                rounded to the storage type as it stores it)
//                                quantized as quant_rows_e4m3 would quantize
//                                that output: the norm's output is never stored.
//   geglu_e4m3_{f16,bf16}        the same for GEGLU (geglu_* in sdxl.cu): one
//                                block per row, the row's amax, then its codes.
//   fp8_epilogue_{f16,bf16}      y = d * sw[col] * sx[row] + bias[col] (+ res),
//                                for a cuBLASLt that cannot apply the two
//                                scale vectors itself (d is the unscaled bf16
//                                product).
//
// Statistics and arithmetic in f32, one rounding to the storage type.

#include <cuda_fp8.h>

#include "common.cuh"

namespace {

constexpr float kE4m3Max = 448.f;


// A row's scale from its amax: an all-zero row keeps scale 1 (its codes are
// all zero anyway); a non-finite amax is passed on so the caller sees it
// rather than garbage.
__device__ __forceinline__ float e4m3_scale(float amax) { return amax > 0.f ? amax / kE4m3Max : 1.f; }

// Eight values times `inv` as e4m3 codes, in order, saturating.
__device__ __forceinline__ uint2 e4m3x8(const float (&f)[8], float inv) {
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int e = 0; e < 4; e += 2) {
    const __nv_fp8x2_storage_t a =
        __nv_cvt_float2_to_fp8x2(make_float2(f[e] * inv, f[e + 1] * inv), __NV_SATFINITE, __NV_E4M3);
    const __nv_fp8x2_storage_t b =
        __nv_cvt_float2_to_fp8x2(make_float2(f[e + 4] * inv, f[e + 5] * inv), __NV_SATFINITE, __NV_E4M3);
    lo |= uint32_t(a) << (8 * e);
    hi |= uint32_t(b) << (8 * e);
  }
  return make_uint2(lo, hi);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// One warp per row of `k` elements (k a multiple of 8, rows 16-byte aligned).
// The row is read twice: the second pass hits L1/L2 (a row is at most a few KB).
template <typename T>
__device__ __forceinline__ void quant_rows_e4m3(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                float* __restrict__ scale, long long rows, int k) {
  const int lane = threadIdx.x & 31;
  const long long row = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int nvec = k / 8;
  const T* xr = x + row * k;
  float amax = 0.f;
  for (int v = lane; v < nvec; v += 32) {
    const Pack8<T> p = *reinterpret_cast<const Pack8<T>*>(xr + v * 8);
#pragma unroll
    for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(to_f32(p.e[e])));
  }
  amax = warp_max(amax);
  const float s = e4m3_scale(amax);
  const float inv = 1.f / s;
  if (lane == 0) scale[row] = s;
  uint8_t* qr = q + row * k;
  for (int v = lane; v < nvec; v += 32) {
    const Pack8<T> p = *reinterpret_cast<const Pack8<T>*>(xr + v * 8);
    float f[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = to_f32(p.e[e]);
    *reinterpret_cast<uint2*>(qr + v * 8) = e4m3x8(f, inv);
  }
}

// layer_norm_* (one warp per row, n <= 2048, n % 8 == 0), each output rounded
// to T as that kernel stores it, then quantized as quant_rows_e4m3 quantizes
// a stored row: the same codes and scales as the two kernels one after the other.
template <typename T>
__device__ __forceinline__ void layer_norm_e4m3(const T* __restrict__ x, const T* __restrict__ gamma,
                                                const T* __restrict__ beta, uint8_t* __restrict__ q,
                                                float* __restrict__ scale, long long rows, int n, float eps) {
  const int lane = threadIdx.x & 31;
  const long long row = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int nvec = n / 8;
  float v[kLayerNormMaxVec][8];
  float mean, rstd;
  layer_norm_row<T>(x + row * n, lane, n, eps, v, mean, rstd);
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < kLayerNormMaxVec; ++j) {
    const int vi = j * 32 + lane;
    if (vi < nvec) {
      const Pack8<T> g = *reinterpret_cast<const Pack8<T>*>(gamma + vi * 8);
      const Pack8<T> b = *reinterpret_cast<const Pack8<T>*>(beta + vi * 8);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[j][e] = to_f32(layer_norm1<T>(v[j][e], mean, rstd, g.e[e], b.e[e]));
        amax = fmaxf(amax, fabsf(v[j][e]));
      }
    }
  }
  amax = warp_max(amax);
  const float s = e4m3_scale(amax);
  const float inv = 1.f / s;
  if (lane == 0) scale[row] = s;
  uint8_t* qr = q + row * n;
#pragma unroll
  for (int j = 0; j < kLayerNormMaxVec; ++j) {
    const int vi = j * 32 + lane;
    if (vi < nvec) *reinterpret_cast<uint2*>(qr + vi * 8) = e4m3x8(v[j], inv);
  }
}

// Eight GEGLU outputs (columns c..c+7 of row hr, h being [rows, 2 * inner]),
// rounded to T as geglu_* stores them.
template <typename T>
__device__ __forceinline__ void geglu8(const T* __restrict__ hr, int inner, int c, float (&f)[8]) {
  const Pack8<T> xs = *reinterpret_cast<const Pack8<T>*>(hr + c);
  const Pack8<T> gs = *reinterpret_cast<const Pack8<T>*>(hr + inner + c);
#pragma unroll
  for (int e = 0; e < 8; ++e) f[e] = to_f32(from_f32<T>(geglu1(to_f32(xs.e[e]), to_f32(gs.e[e]))));
}

// GEGLU of row blockIdx.x (inner % 8 == 0, 16-byte aligned) quantized like
// quant_rows_e4m3 quantizes geglu_*'s output: one pass for the amax, a block
// reduction, a second pass (from L1/L2: a row is at most a few tens of KB)
// for the codes.
template <typename T>
__device__ __forceinline__ void geglu_e4m3(const T* __restrict__ h, uint8_t* __restrict__ q,
                                           float* __restrict__ scale, int inner) {
  __shared__ float warp_amax[32];
  const long long row = blockIdx.x;
  const T* hr = h + row * 2 * inner;
  const int nvec = inner / 8;
  float f[8];
  float amax = 0.f;
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    geglu8<T>(hr, inner, v * 8, f);
#pragma unroll
    for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(f[e]));
  }
  amax = warp_max(amax);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) warp_amax[warp] = amax;
  __syncthreads();
  amax = lane < warps ? warp_amax[lane] : 0.f;
  amax = warp_max(amax);
  const float s = e4m3_scale(amax);
  const float inv = 1.f / s;
  if (threadIdx.x == 0) scale[row] = s;
  uint8_t* qr = q + row * inner;
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    geglu8<T>(hr, inner, v * 8, f);
    *reinterpret_cast<uint2*>(qr + v * 8) = e4m3x8(f, inv);
  }
}

// `d`, `res` and `y` are row-major [rows, cols] (cols a multiple of 8).
template <typename T>
__device__ __forceinline__ void fp8_epilogue(const __nv_bfloat16* __restrict__ d, const float* __restrict__ sw,
                                             const float* __restrict__ sx, const T* __restrict__ bias,
                                             const T* __restrict__ res, T* __restrict__ y, long long rows,
                                             int cols) {
  const long long nvec = rows * (long long)(cols / 8);
  for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < nvec;
       v += (long long)gridDim.x * blockDim.x) {
    const long long i = v * 8;
    const long long row = i / cols;
    const int col = int(i - row * cols);
    const Pack8<__nv_bfloat16> dv = *reinterpret_cast<const Pack8<__nv_bfloat16>*>(d + i);
    const float s = sx[row];
    float out[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = to_f32(dv.e[e]) * sw[col + e] * s;
    if (bias != nullptr) {
      const Pack8<T> b = *reinterpret_cast<const Pack8<T>*>(bias + col);
#pragma unroll
      for (int e = 0; e < 8; ++e) out[e] += to_f32(b.e[e]);
    }
    if (res != nullptr) {
      const Pack8<T> r = *reinterpret_cast<const Pack8<T>*>(res + i);
#pragma unroll
      for (int e = 0; e < 8; ++e) out[e] += to_f32(r.e[e]);
    }
    Pack8<T> o;
#pragma unroll
    for (int e = 0; e < 8; ++e) o.e[e] = from_f32<T>(out[e]);
    *reinterpret_cast<Pack8<T>*>(y + i) = o;
  }
}

}  // namespace

#define FP8_KERNELS(SUFFIX, T)                                                                                  \
  extern "C" __global__ void quant_rows_e4m3_##SUFFIX(const T* x, uint8_t* q, float* scale, long long rows,    \
                                                      int k) {                                                  \
    quant_rows_e4m3<T>(x, q, scale, rows, k);                                                                   \
  }                                                                                                             \
  extern "C" __global__ void layer_norm_e4m3_##SUFFIX(const T* x, const T* gamma, const T* beta, uint8_t* q,      \
                                                      float* scale, long long rows, int n, float eps) {           \
    layer_norm_e4m3<T>(x, gamma, beta, q, scale, rows, n, eps);                                                 \
  }                                                                                                             \
  extern "C" __global__ void geglu_e4m3_##SUFFIX(const T* h, uint8_t* q, float* scale, int inner) {             \
    geglu_e4m3<T>(h, q, scale, inner);                                                                          \
  }                                                                                                             \
  extern "C" __global__ void fp8_epilogue_##SUFFIX(const __nv_bfloat16* d, const float* sw, const float* sx,   \
                                                   const T* bias, const T* res, T* y, long long rows, int cols) { \
    fp8_epilogue<T>(d, sw, sx, bias, res, y, rows, cols);                                                       \
  }
FP8_KERNELS(f16, __half)
FP8_KERNELS(bf16, __nv_bfloat16)
