#!/usr/bin/env python3
"""Where the GPU time of one profiled region goes, from `ncu --csv --page raw
--metrics gpu__time_duration.sum`: total per kernel name and per family
(attention, convolution, GEMM, norm, element-wise, copies), largest first."""
import csv
import re
import sys
from collections import defaultdict


def family(name: str) -> str:
    n = name.lower()
    rules = [
        ("flash attention (ours)", r"flash_(attn|wgmma)"),
        ("group norm (ours)", r"group_norm_"),
        ("geglu (ours)", r"geglu"),
        ("convolution (cuDNN)", r"conv|cudnn|implicit|nchw|nhwc|xmma_fprop|fprop|winograd|fft"),
        ("im2col (candle)", r"im2col"),
        ("GEMM (cuBLAS)", r"gemm|sm90_xmma|cutlass|nvjet|ampere_|hopper"),
        ("softmax", r"softmax"),
        ("layer norm", r"layernorm|layer_norm|rmsnorm"),
        ("reductions", r"reduce|sum|max|min|fast_"),
        ("copies / layout", r"copy|ucopy|transpose|cast|to_dtype|where"),
        ("element-wise", r"affine|badd|bmul|bsub|bdiv|silu|gelu|sigmoid|exp|sqrt|sqr|neg|uadd|umul|unary|binary"),
    ]
    for fam, pat in rules:
        if re.search(pat, n):
            return fam
    return "other"


def main(path: str) -> None:
    rows = list(csv.reader(l for l in open(path, errors="replace") if l.startswith('"')))
    header = rows[0]
    ki = header.index("Kernel Name")
    ti = header.index("gpu__time_duration.sum")
    by_kernel = defaultdict(lambda: [0.0, 0])
    unit = rows[1][ti] if len(rows) > 1 else ""
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, 1e-6)
    for r in rows[2:]:
        try:
            t = float(r[ti].replace(",", "")) * scale
        except ValueError:
            continue
        by_kernel[r[ki]][0] += t
        by_kernel[r[ki]][1] += 1
    total = sum(v[0] for v in by_kernel.values())
    launches = sum(v[1] for v in by_kernel.values())
    by_family = defaultdict(lambda: [0.0, 0])
    for k, (t, n) in by_kernel.items():
        by_family[family(k)][0] += t
        by_family[family(k)][1] += n
    print(f"total kernel time {total:.2f} ms over {launches} launches")
    print("\n| family | ms | share | launches |\n|---|---|---|---|")
    for f, (t, n) in sorted(by_family.items(), key=lambda kv: -kv[1][0]):
        print(f"| {f} | {t:.2f} | {100 * t / total:.1f}% | {n} |")
    print("\n| kernel | ms | launches |\n|---|---|---|")
    for k, (t, n) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:40]:
        print(f"| {k[:110]} | {t:.2f} | {n} |")


if __name__ == "__main__":
    main(sys.argv[1])
