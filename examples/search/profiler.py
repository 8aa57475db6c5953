"""A latency probe for `compress search --profiler`: `python profiler.py [--threads N] [--runs N] MODEL.onnx`
prints the median milliseconds of one forward pass (batch 1, 128 tokens of token ids).

Replace the body with what measures your target: push the file to a phone with adb and run
onnxruntime's perf test there, or ssh to a board; the search only reads the last number printed."""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {}
    for inp in sess.get_inputs():
        ids = rng.integers(1000, 2000, size=(1, args.seq)) if "ids" in inp.name else np.ones((1, args.seq))
        feed[inp.name] = ids.astype(np.int64)
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    print(f"{statistics.median(times):.4f}")


if __name__ == "__main__":
    main()
