"""The two ceilings every figure is compared with, measured on the machine itself (benchmarks/METHOD.md's "two
numbers first"): device-to-device copy bandwidth, counting bytes read plus bytes written, and the bf16 matrix
product rate on random data. Each is the median of repeated timed runs after warm-up.

usage: python benchmarks/ceilings.py --output ceilings.json
"""
import argparse
import json
import statistics
import time

import torch


def _median_seconds(fn, repeats):
    fn()
    fn()  # warm-up: allocation, library handles, clocks
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _copy_seconds(copy_bytes, repeats, device):
    source = torch.randn(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    return _median_seconds(lambda: target.copy_(source), repeats)


def _matmul_seconds(size, repeats, device):
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    return _median_seconds(lambda: a @ b, repeats)


def measure(copy_bytes, matmul_size, repeats):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    copy_seconds = _copy_seconds(copy_bytes, repeats, device)  # its buffers are freed before the matmul's
    matmul_seconds = _matmul_seconds(matmul_size, repeats, device)
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "copy_gb_per_s": 2 * copy_bytes / copy_seconds / 1e9,
            "bf16_matmul_tflops": 2 * matmul_size ** 3 / matmul_seconds / 1e12,
            "copy_bytes": copy_bytes, "matmul_size": matmul_size, "repeats": repeats}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for a dry run on a CPU")
    args = parser.parse_args()
    sizes = (1 << 20, 256, 3) if args.small else (4 << 30, 8192, 10)
    result = measure(*sizes)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"ceilings on {result['device']}: copy {result['copy_gb_per_s']:.0f} GB/s, bf16 matmul "
          f"{result['bf16_matmul_tflops']:.1f} TFLOP/s")


if __name__ == "__main__":
    main()
