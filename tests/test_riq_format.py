"""The .riq container: seeded round trips (a hand-rolled property loop), bit-exact weights, the ANS
rate against the empirical entropy, speed on 12M codes, and RiqFormatError for every damaged file."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from compress.exporters import riq_format as riq
from compress.exporters.riq_format import CodedTensor, RawTensor, RiqFormatError

RAW_DTYPES = ["bool", "int8", "int64", "uint8", "uint64", "float16", "float32", "float64", "complex64"]
SHAPES = [(), (1,), (0,), (0, 3), (7,), (2, 3, 4), (64, 48), (5000,)]


def _codes(rng, shape) -> np.ndarray:
    kind = rng.choice(["laplace", "wide", "negative", "zero", "constant", "rare"])
    n = math.prod(shape)
    codes = {"laplace": lambda: np.round(rng.laplace(0, rng.uniform(0.3, 30), n)),
             "wide": lambda: rng.integers(-2**31, 2**31, n),  # sparse range: the np.unique path
             "negative": lambda: -rng.geometric(0.2, n),
             "zero": lambda: np.zeros(n),
             "constant": lambda: np.full(n, rng.integers(-1000, 1000)),
             "rare": lambda: np.where(rng.random(n) < 0.001, 5000, 0)}[kind]().astype(np.int64)
    fits = [d for d in ("int8", "int16", "int32", "int64", "uint8", "uint16")
            if n == 0 or np.iinfo(d).min <= codes.min() and codes.max() <= np.iinfo(d).max]
    return codes.astype(rng.choice(fits)).reshape(shape)


def _random_tensors(rng) -> list[CodedTensor | RawTensor]:
    tensors = []
    for i in range(rng.integers(1, 5)):
        shape = SHAPES[rng.integers(len(SHAPES))]
        if rng.random() < 0.6:
            tensors.append(CodedTensor(f"coded.{i}", shape, _codes(rng, shape), float(rng.uniform(1e-4, 1))))
        else:
            dtype = np.dtype(rng.choice(RAW_DTYPES))
            array = (rng.normal(0, 100, shape) if dtype.kind in "fc" else rng.integers(0, 2, shape)).astype(dtype)
            tensors.append(RawTensor(f"raw.{i}", array))
    return tensors


def _assert_same(written, read_back) -> None:
    assert [t.name for t in read_back] == [t.name for t in written]
    for w, r in zip(written, read_back):
        assert type(r) is type(w)
        if isinstance(w, CodedTensor):
            assert r.shape == tuple(w.shape) and r.codes.dtype == np.int32
            np.testing.assert_array_equal(r.codes, w.codes)
            assert r.delta == float(np.float32(w.delta))
        else:
            assert r.array.dtype == w.array.dtype and r.array.shape == w.array.shape
            assert r.array.tobytes() == w.array.tobytes()


@pytest.fixture
def small_file(tmp_path) -> bytes:
    """A file with every kind of entry: ANS-coded, single-symbol, empty, raw, meta."""
    rng = np.random.default_rng(7)
    tensors = [CodedTensor("w", (16, 8), np.round(rng.laplace(0, 2, (16, 8))).astype(np.int8), 0.05),
               CodedTensor("zeros", (4,), np.zeros(4, np.int32), 0.5),
               CodedTensor("empty", (0, 2), np.zeros((0, 2), np.int32), 1.0),
               RawTensor("bias", rng.normal(size=8).astype(np.float32))]
    riq.write(tmp_path / "small.riq", tensors, {"graph": b"onnx bytes" * 20})
    return (tmp_path / "small.riq").read_bytes()


def _with_header(data: bytes, edit) -> bytes:
    """`data` with its JSON header changed by `edit` and the header checksum recomputed (layout per the docstring)."""
    _, version, length, _ = struct.unpack_from("<4sHII", data)
    header = json.loads(data[14:14 + length])
    edit(header)
    text = json.dumps(header).encode()
    fixed = riq.MAGIC + struct.pack("<HI", version, len(text))
    return fixed + struct.pack("<I", zlib.crc32(text, zlib.crc32(fixed))) + text + data[14 + length:]


def _read_error(tmp_path, data: bytes) -> str:
    path = tmp_path / "bad.riq"
    path.write_bytes(data)
    with pytest.raises(RiqFormatError) as e:
        riq.read(path)
    assert str(e.value).startswith(str(path))  # the message names the file
    return str(e.value)


# ---- round trips ---------------------------------------------------------------------------------

def test_riq_round_trip_random_cases(tmp_path):
    rng = np.random.default_rng(0)
    for case in range(50):
        tensors = _random_tensors(rng)
        meta = {f"m{j}": rng.bytes(rng.integers(0, 300)) for j in range(rng.integers(0, 3))}
        path = tmp_path / f"case{case}.riq"

        stats = riq.write(path, tensors, meta)
        read_back, meta_back = riq.read(path)

        _assert_same(tensors, read_back)
        assert meta_back == meta
        size = path.stat().st_size
        assert size == stats["file_bytes"] == stats["header_bytes"] + sum(stats["tensor_bytes"].values()) + sum(
            stats["meta_bytes"].values())


def test_riq_weights_are_codes_times_float32_delta_bit_exact(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.integers(-300, 300, (32, 16)).astype(np.int16)
    bias = rng.normal(size=16).astype(np.float16)
    riq.write(tmp_path / "m.riq", [CodedTensor("w", (32, 16), codes, 0.1), RawTensor("b", bias)])

    weights, meta = riq.decode_weights(tmp_path / "m.riq")

    expected = codes.astype(np.float32) * np.float32(0.1)
    assert weights["w"].dtype == np.float32 and meta == {}
    assert weights["w"].view(np.uint32).tolist() == expected.view(np.uint32).tolist()
    assert weights["b"].dtype == np.float16 and weights["b"].tobytes() == bias.tobytes()


def test_riq_info_reports_table_without_decoding_payloads(tmp_path, small_file):
    path = tmp_path / "damaged.riq"
    path.write_bytes(small_file[:-1] + bytes([small_file[-1] ^ 0xFF]))  # the last meta byte

    table = riq.info(path)

    assert table["file_bytes"] == len(small_file)
    by_name = {t["name"]: t for t in table["tensors"]}
    assert by_name["w"]["symbols"] == 128 and by_name["w"]["kind"] == "coded"
    assert by_name["w"]["delta"] == float(np.float32(0.05))
    assert by_name["w"]["bits_per_weight"] == 8 * (by_name["w"]["table_bytes"] + by_name["w"]["payload_bytes"]) / 128
    assert by_name["zeros"]["alphabet"] == 1 and by_name["zeros"]["payload_bytes"] == 0
    assert by_name["bias"]["dtype"] == "float32" and by_name["bias"]["bits_per_weight"] == 32
    assert table["meta"]["graph"]["raw_bytes"] == 200
    with pytest.raises(RiqFormatError, match="meta 'graph' fails its CRC32"):
        riq.read(path)


@pytest.mark.parametrize("p_zero", [0.5, 0.95])
def test_riq_ans_payload_is_within_1_percent_of_empirical_entropy(tmp_path, p_zero):
    rng = np.random.default_rng(2)
    n = 200_000
    codes = np.where(rng.random(n) < p_zero, 0, np.round(rng.laplace(0, 4, n))).astype(np.int32)
    _, counts = np.unique(codes, return_counts=True)
    entropy_bits = -(counts * np.log2(counts / n)).sum()

    riq.write(tmp_path / "t.riq", [CodedTensor("t", (n,), codes, 1.0)])

    payload_bits = 8 * riq.info(tmp_path / "t.riq")["tensors"][0]["payload_bytes"]
    # An i.i.d. model fitted to the counts cannot beat n * H; 64 bits = the ANS state flushed at the end.
    assert entropy_bits - 64 <= payload_bits <= 1.01 * entropy_bits + 64


def test_riq_rare_symbol_stays_encodable(tmp_path):
    codes = np.zeros(10_000_000, np.int32)
    codes[1_234_567] = 5000

    riq.write(tmp_path / "rare.riq", [CodedTensor("rare", codes.shape, codes, 0.01)])
    (tensor,), _ = riq.read(tmp_path / "rare.riq")

    assert np.array_equal(tensor.codes, codes)
    # 24 bits for the rare symbol (probability 2**-24) + 10M * 8.6e-8 bits for the zeros, in 32-bit words.
    assert riq.info(tmp_path / "rare.riq")["tensors"][0]["payload_bytes"] <= 12


def test_riq_12m_codes_encode_and_decode_in_seconds(tmp_path):
    codes = np.round(np.random.default_rng(3).laplace(0, 3, (30522, 384))).astype(np.int8)  # an 11.7M embedding

    start = time.perf_counter()
    riq.write(tmp_path / "emb.riq", [CodedTensor("emb", codes.shape, codes, 0.02)])
    (tensor,), _ = riq.read(tmp_path / "emb.riq")
    seconds = time.perf_counter() - start

    assert np.array_equal(tensor.codes, codes)
    # Measured 0.5 s write + read on 2 CPU cores; a Python loop per symbol would take minutes.
    assert seconds < 15


def test_riq_module_is_standalone():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import riq_format; "  # as if copied alone to a device
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'pydantic', 'compress'}))")

    out = subprocess.run([sys.executable, "-c", code, str(Path(riq.__file__).parent)],
                         capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"


# ---- writing -------------------------------------------------------------------------------------

def test_riq_write_replaces_atomically_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "m.riq"
    path.write_bytes(b"old")

    riq.write(path, [RawTensor("a", np.arange(3))])

    assert [p.name for p in tmp_path.iterdir()] == ["m.riq"]
    assert riq.read(path)[0][0].array.tolist() == [0, 1, 2]


def test_riq_write_lists_every_problem_and_writes_nothing(tmp_path):
    bad = [CodedTensor("a", (2,), np.zeros(2, np.float32), 0.1),  # float codes
           CodedTensor("a", (3,), np.zeros(2, np.int32), 0.1),  # duplicate name, shape mismatch
           CodedTensor("big", (1,), np.array([2**40]), 0.1),  # out of int32
           CodedTensor("nan", (1,), np.zeros(1, np.int8), float("nan")),
           RawTensor("obj", np.array(["x"], dtype=object))]

    with pytest.raises(ValueError, match="6 problem") as e:
        riq.write(tmp_path / "m.riq", bad)

    for expected in ("integer numpy array", "unique", "shape", "fit int32", "finite float32", "dtype in"):
        assert expected in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_riq_write_rejects_alphabet_larger_than_the_ans_model_takes(tmp_path, monkeypatch):
    monkeypatch.setattr(riq, "_MAX_ALPHABET", 3)  # the real limit, 2**24 - 2, needs 16M distinct codes

    with pytest.raises(ValueError, match="4 distinct codes"):
        riq.write(tmp_path / "m.riq", [CodedTensor("w", (4,), np.arange(4), 1.0)])


# ---- damaged files -------------------------------------------------------------------------------

def test_riq_header_rewrite_helper_keeps_a_valid_file(tmp_path, small_file):
    (tmp_path / "same.riq").write_bytes(_with_header(small_file, lambda h: None))

    assert [t.name for t in riq.read(tmp_path / "same.riq")[0]] == ["w", "zeros", "empty", "bias"]


def test_riq_read_and_info_reject_truncation_at_every_offset(tmp_path, small_file):
    path = tmp_path / "cut.riq"
    for cut in range(len(small_file)):
        path.write_bytes(small_file[:cut])
        with pytest.raises(RiqFormatError):
            riq.read(path)
        with pytest.raises(RiqFormatError):
            riq.info(path)


def test_riq_read_rejects_single_bit_flips(tmp_path, small_file):
    rng = np.random.default_rng(4)
    positions = list(range(14 * 8)) + rng.choice(8 * len(small_file), 400, replace=False).tolist()
    for bit in positions:  # every bit of the fixed prefix, then 400 anywhere
        data = bytearray(small_file)
        data[bit // 8] ^= 1 << (bit % 8)
        _read_error(tmp_path, bytes(data))


def test_riq_read_rejects_random_bytes(tmp_path):
    rng = np.random.default_rng(5)
    for i in range(200):
        noise = rng.bytes(rng.integers(0, 400))
        _read_error(tmp_path, riq.MAGIC + struct.pack("<H", 1) + noise if i % 2 else noise)


@pytest.mark.parametrize("data, message", [
    (b"", "empty file"),
    (b"PK\x03\x04" + bytes(40), "not a .riq file"),
    (b"RIQ\x00\x01\x00", "truncated"),
])
def test_riq_read_rejects_non_riq_files(tmp_path, data, message):
    assert message in _read_error(tmp_path, data)


def test_riq_read_rejects_a_newer_version(tmp_path, small_file):
    data = small_file[:4] + struct.pack("<H", 2) + small_file[6:]

    assert "format version 2 (newer than this reader" in _read_error(tmp_path, data)


def test_riq_read_rejects_trailing_bytes(tmp_path, small_file):
    assert "trailing bytes" in _read_error(tmp_path, small_file + b"\x00")


def _set(path: list, value):
    def edit(header):
        node = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit", [
    _set(["tensors", 0, "symbols"], 127),
    _set(["tensors", 0, "shape"], [16, -8]),
    _set(["tensors", 0, "alphabet"], 10**9),
    _set(["tensors", 0, "delta"], "nan"),
    _set(["tensors", 0, "kind"], "float"),
    _set(["tensors", 0, "extra"], 1),
    _set(["tensors", 1, "name"], "w"),
    _set(["tensors", 3, "dtype"], "|O8"),
    _set(["tensors", 3, "shape"], [9]),
    _set(["tensors", 0, "payload", "offset"], 0),
    _set(["data_bytes"], 10**12),
    _set(["meta", "graph", "raw_length"], 10**12),
])
def test_riq_read_rejects_inconsistent_table_with_valid_checksum(tmp_path, small_file, edit):
    message = _read_error(tmp_path, _with_header(small_file, edit))

    assert any(m in message for m in ("inconsistent table", "file has", "inflates to"))


def test_riq_read_rejects_ans_payload_that_does_not_match_its_table(tmp_path, small_file):
    header = json.loads(small_file[14:14 + struct.unpack_from("<I", small_file, 6)[0]])
    start = len(small_file) - header["data_bytes"]
    blob = header["tensors"][0]["payload"]
    at = start + blob["offset"]
    data = bytearray(small_file)
    data[at:at + 4] = (struct.unpack_from("<I", data, at)[0] ^ 0x5A5A5A5A).to_bytes(4, "little")
    crc = zlib.crc32(data[at:at + blob["length"]])

    message = _read_error(tmp_path, _with_header(bytes(data), _set(["tensors", 0, "payload", "crc32"], crc)))

    assert "payload of 'w'" in message
