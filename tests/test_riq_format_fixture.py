"""Old .riq files keep decoding: tests/data/riq_v1.riq was written by the format-version-1 writer
(`riq_format.write`, 2026-11-29; committed: never regenerate it when the format changes, add a file
for the new version beside it). It holds every kind of entry: ANS-coded tensors (Laplacian int8
codes, 90% zeros with one rare code, int16-range codes), a one-symbol tensor, an empty one, raw
float32 / int64 / float16 tensors and two meta blobs. What it must decode to is pinned below as
SHA-256 prefixes of the little-endian int32 codes (raw tensors: their bytes), recorded when it was written."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from compress.exporters import riq_format as riq
from compress.exporters.riq_format import CodedTensor

V1 = Path(__file__).parent / "data" / "riq_v1.riq"
CODED = {  # name: (shape, float32 delta, sha256 of the codes as <i4)
    "encoder.layer.0.weight": ((24, 16), 0.0125, "45f53d123ecde31d1a6206b31282a75c"),
    "sparse.weight": ((32, 16), 0.003, "b095ca4fadd4035c23bb44ab7e6b6707"),
    "wide.weight": ((300,), 1e-5, "42f08e4910e1773d2477bae0a2b637ce"),
    "zeros": ((4,), 0.5, "374708fff7719dd5979ec875d56cd228"),
    "empty": ((0, 2), 1.0, "e3b0c44298fc1c149afbf4c8996fb924"),
}
RAW = {  # name: (dtype, shape, sha256 of the bytes)
    "bias": ("float32", (8,), "88cf1ec2e8128f85a5af2119b61beb94"),
    "ids": ("int64", (5,), "281b02b10f5f4997e5bf8c93343e6f2a"),
    "half": ("float16", (2, 3), "229b4569487b2ad5d8f44d0fbfd7f58b"),
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def test_version_1_file_decodes_bit_exactly():
    tensors, meta = riq.read(V1)

    assert [t.name for t in tensors] == [*CODED, *RAW]  # in the order written
    for t in tensors:
        if isinstance(t, CodedTensor):
            shape, delta, sha = CODED[t.name]
            assert (t.shape, t.delta, _sha(t.codes.astype("<i4").tobytes())) == (shape, float(np.float32(delta)), sha)
            assert t.weights().dtype == np.float32
        else:
            dtype, shape, sha = RAW[t.name]
            assert (str(t.array.dtype), t.array.shape, _sha(t.array.tobytes())) == (dtype, shape, sha)
    assert meta == {"graph": b"onnx bytes" * 20, "note": b"fixture v1"}


def test_version_1_file_sparse_tensor_keeps_its_rare_code():
    tensors, _ = riq.read(V1)
    sparse = next(t for t in tensors if t.name == "sparse.weight")

    assert sparse.codes[3, 5] == 120 and (sparse.codes == 0).mean() > 0.8


def test_version_1_file_info_reads_its_version():
    assert riq.info(V1)["version"] == 1
