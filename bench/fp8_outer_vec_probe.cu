// Which FP8 (e4m3) cuBLASLt products with outer-vector scales (one f32 per
// output channel, one per token: CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F)
// this GPU and cuBLASLt run, for the descriptor `sdxl/src/cuda/gemm.rs`
// builds: TN, f32 compute, D in f16 or bf16, with or without the bias
// epilogue, the residual as C (beta = 1) and fast accumulation. The worker
// falls back to a bf16 product plus our scaling pass when the heuristic
// finds nothing; this says which attribute makes it do so. Each variant
// runs the heuristic and then the product, checks the product against a
// CPU reference at 64 points, and times it. Built here or on the GPU machine:
//   nvcc -O2 -arch=sm_90 -std=c++17 -I$SP/nvidia/cu13/include bench/fp8_outer_vec_probe.cu \
//     -L$SP/nvidia/cu13/lib -lcublasLt -o /tmp/probe && /tmp/probe
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

static const char* status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "ok";
    case CUBLAS_STATUS_INVALID_VALUE: return "INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "NOT_SUPPORTED";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "EXECUTION_FAILED";
    default: return "other";
  }
}

struct Variant {
  bool bf16_out, bias, residual, fast_accum, outer_vec, late_pointers;
};

static float to_float(const void* d, bool bf16, size_t i) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(d)[i])
              : __half2float(static_cast<const __half*>(d)[i]);
}

int main() {
  // an SDXL feed-forward shape at 1024², batch 2: 8192 tokens, 1280 -> 5120
  const int64_t m = 5120, n = 8192, k = 1280;
  printf("cublasLt %zu\n", cublasLtGetVersion());
  std::vector<uint8_t> ha(m * k), hb(n * k);
  uint32_t s = 1;
  auto next = [&] { s = s * 1664525u + 1013904223u; return s >> 8; };
  auto code = [&] {  // e4m3 codes of values in about [-2, 2], no NaN
    return static_cast<uint8_t>(__nv_fp8_e4m3((static_cast<float>(next() % 4001) - 2000.f) / 1000.f).__x);
  };
  for (auto& x : ha) x = code();
  for (auto& x : hb) x = code();
  std::vector<float> sa(m), sb(n);
  for (auto& x : sa) x = 0.5f + static_cast<float>(next() % 100) / 100.f;
  for (auto& x : sb) x = 0.5f + static_cast<float>(next() % 100) / 100.f;
  void *a, *b, *d, *c, *bias, *ws;
  float *dsa, *dsb, *one;
  const size_t ws_size = 32 << 20;
  cudaMalloc(&a, m * k); cudaMalloc(&b, n * k); cudaMalloc(&d, m * n * 2); cudaMalloc(&c, m * n * 2);
  cudaMalloc(&bias, m * 2); cudaMalloc(&ws, ws_size);
  cudaMalloc(&dsa, m * 4); cudaMalloc(&dsb, n * 4); cudaMalloc(&one, 4);
  cudaMemcpy(a, ha.data(), m * k, cudaMemcpyHostToDevice);
  cudaMemcpy(b, hb.data(), n * k, cudaMemcpyHostToDevice);
  cudaMemcpy(dsa, sa.data(), m * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dsb, sb.data(), n * 4, cudaMemcpyHostToDevice);
  cudaMemset(c, 0, m * n * 2);  // zero residual and bias: the reference needs no add
  cudaMemset(bias, 0, m * 2);
  // reference for a few outputs: D[i, j] = sa[i] sb[j] sum_l A[i, l] B[j, l]
  auto ref = [&](int64_t i, int64_t j, bool scaled) {
    double acc = 0;
    for (int64_t l = 0; l < k; ++l) {
      __nv_fp8_e4m3 x, y;
      x.__x = ha[i * k + l];
      y.__x = hb[j * k + l];
      acc += static_cast<double>(float(x)) * static_cast<double>(float(y));
    }
    return scaled ? acc * sa[i] * sb[j] : acc;
  };
  cublasLtHandle_t lt;
  cublasLtCreate(&lt);
  printf("| D | bias | residual | fast accum | scales | heuristic | matmul | max rel. error | ms |\n");
  printf("|---|---|---|---|---|---|---|---|---|\n");
  // bit 32: the bias and scale pointers set only after the heuristic, as a
  // plan cached per shape would set them for each call
  for (int bits = 0; bits < 64; ++bits) {
    Variant v{(bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0, (bits & 8) != 0, (bits & 16) != 0, (bits & 32) != 0};
    if (v.late_pointers && !v.outer_vec && !v.bias) continue;
    auto set_pointers = [&](cublasLtMatmulDesc_t desc) {
      if (v.bias) cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias));
      if (v.outer_vec) {
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &dsa, sizeof(dsa));
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &dsb, sizeof(dsb));
      }
    };
    cublasLtMatmulDesc_t desc;
    cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t));
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof(nn));
    cublasLtEpilogue_t epi = v.bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi));
    if (!v.late_pointers) set_pointers(desc);
    int8_t fast = v.fast_accum ? 1 : 0;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast));
    if (v.outer_vec) {
      cublasLtMatmulMatrixScale_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode));
      cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode));
    }
    cudaDataType_t out = v.bf16_out ? CUDA_R_16BF : CUDA_R_16F;
    cublasLtMatrixLayout_t la, lb, ld;
    cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, k, m, k);
    cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, k, n, k);
    cublasLtMatrixLayoutCreate(&ld, out, m, n, m);
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulPreferenceCreate(&pref);
    uint64_t wsz = ws_size;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz, sizeof(wsz));
    cublasLtMatmulHeuristicResult_t h{};
    int count = 0;
    cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, ld, ld, pref, 1, &h, &count);
    cublasStatus_t ms = CUBLAS_STATUS_NOT_SUPPORTED;
    double err = -1, millis = -1;
    if (v.late_pointers) set_pointers(desc);
    if (hs == CUBLAS_STATUS_SUCCESS && count > 0) {
      float alpha = 1.f, beta = v.residual ? 1.f : 0.f;
      auto run = [&] {
        return cublasLtMatmul(lt, desc, &alpha, a, la, b, lb, &beta, v.residual ? c : d, ld, d, ld, &h.algo, ws,
                              ws_size, 0);
      };
      ms = run();
      if (ms == CUBLAS_STATUS_SUCCESS && cudaDeviceSynchronize() == cudaSuccess) {
        std::vector<uint16_t> hd(m * n);
        cudaMemcpy(hd.data(), d, m * n * 2, cudaMemcpyDeviceToHost);
        err = 0;
        for (int probe = 0; probe < 64; ++probe) {
          int64_t i = next() % m, j = next() % n;
          double want = ref(i, j, v.outer_vec), got = to_float(hd.data(), v.bf16_out, j * m + i);
          err = std::fmax(err, std::fabs(got - want) / std::fmax(std::fabs(want), 1.0));
        }
        cudaEvent_t e0, e1;
        cudaEventCreate(&e0); cudaEventCreate(&e1);
        cudaEventRecord(e0);
        for (int r = 0; r < 20; ++r) run();
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float total;
        cudaEventElapsedTime(&total, e0, e1);
        millis = total / 20;
      }
    }
    printf("| %s | %s | %s | %s | %s%s | %s (%d) | %s | %.2e | %.3f |\n", v.bf16_out ? "bf16" : "f16",
           v.bias ? "yes" : "no", v.residual ? "yes" : "no", v.fast_accum ? "yes" : "no",
           v.outer_vec ? "outer vec" : "none", v.late_pointers ? ", pointers after the heuristic" : "",
           status_name(hs), count, status_name(ms), err, millis);
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb); cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatmulDescDestroy(desc);
  }
  return 0;
}
