// Shared by our kernel modules (`#include "common.cuh"`): conversions to and
// from f32, an 8-element vector for 16-byte loads and stores, and the
// arithmetic that two modules must do alike (GEGLU's, a layer norm row's
// statistics: sdxl.cu's kernels and the FP8 kernels that fuse them).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
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

template <typename T>
struct alignas(16) Pack8 {
  T e[8];
};

// GEGLU of one element: x * gelu_erf(gate).
__device__ __forceinline__ float geglu1(float xv, float gv) {
  return xv * 0.5f * gv * (1.f + erff(gv * 0.70710678118654752f));
}

// A layer norm row (n <= 2048, n % 8 == 0) in one warp's registers: lane
// `lane` loads vectors lane, lane + 32, ... of 8 elements into v (16-byte
// loads) and gets the row's mean and 1/sqrt(var + eps), in f32.
constexpr int kLayerNormMaxVec = 8;  // 8 vectors of 8 per lane: rows up to 2048
template <typename T>
__device__ __forceinline__ void layer_norm_row(const T* __restrict__ xr, int lane, int n, float eps,
                                               float (&v)[kLayerNormMaxVec][8], float& mean, float& rstd) {
  const int nvec = n / 8;
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kLayerNormMaxVec; ++j) {
    const int vi = j * 32 + lane;
    if (vi < nvec) {
      const Pack8<T> p = *reinterpret_cast<const Pack8<T>*>(xr + vi * 8);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[j][e] = to_f32(p.e[e]);
        sum += v[j][e];
      }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  mean = sum / n;
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < kLayerNormMaxVec; ++j) {
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
  rstd = rsqrtf(sq / n + eps);
}

// One normalized element as the layer norm stores it.
template <typename T>
__device__ __forceinline__ T layer_norm1(float v, float mean, float rstd, T g, T b) {
  return from_f32<T>((v - mean) * rstd * to_f32(g) + to_f32(b));
}

}  // namespace
