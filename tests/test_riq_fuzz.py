"""The .riq reader and decoder on crafted and damaged files (issue 13, bounded work on crafted input):
every truncation, bit flip and random byte string is a RiqFormatError; crafted headers with valid
CRCs that declare huge tensors, alphabets or inflated sizes are refused before anything is
allocated, checked in a child process under an address-space limit (no MemoryError, no SIGABRT
from constriction); graphs, initializers and configs that do not fit end in one UserError."""
from __future__ import annotations

import functools
import json
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compress.cli import app
from compress.errors import UserError
from compress.exporters import riq_format as riq
from compress.exporters.riq_export import decode
from compress.exporters.riq_format import CodedTensor, RawTensor, RiqFormatError

HEADROOM = 3 * 2**29  # 1.5 GiB of address space above the child's baseline (numpy + constriction loaded)


# ---- building files ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _sample() -> bytes:
    """A real file from riq_format.write: ANS-coded, constant, empty and sparse coded tensors, raw ones, meta."""
    rng = np.random.default_rng(13)
    tensors = [CodedTensor("w", (32, 16), np.round(rng.laplace(0, 3, (32, 16))).astype(np.int8), 0.05),
               CodedTensor("const", (5,), np.full(5, -3, np.int32), 0.5),
               CodedTensor("empty", (0, 3), np.zeros((0, 3), np.int32), 1.0),
               CodedTensor("sparse", (64,), rng.integers(-2**31, 2**31, 64), 1e-3),
               RawTensor("bias", rng.normal(size=16).astype(np.float32)),
               RawTensor("ids", np.arange(6, dtype=np.int64).reshape(2, 3)),
               RawTensor("flag", np.array(True))]
    with tempfile.TemporaryDirectory(prefix="riq-fuzz-") as tmp:  # the bytes are kept, not the file
        path = Path(tmp) / "sample.riq"
        riq.write(path, tensors, {"kind": b"state_dict", "notes": bytes(range(256)) * 2})
        return path.read_bytes()


def _read(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.riq"
        path.write_bytes(data)
        riq.read(path)


def _frame_text(text: bytes) -> bytes:
    """Prefix + header with the checksum computed as the format's docstring says (a valid CRC)."""
    fixed = riq.MAGIC + struct.pack("<HI", riq.VERSION, len(text))
    return fixed + struct.pack("<I", zlib.crc32(text, zlib.crc32(fixed))) + text


def _frame(header: dict) -> bytes:
    return _frame_text(json.dumps(header, separators=(",", ":")).encode())


def _split(data: bytes) -> tuple[dict, int]:
    """(the JSON header, where the data section starts)."""
    length = struct.unpack_from("<I", data, 6)[0]
    return json.loads(data[14:14 + length]), 14 + length


def _craft(tensors: list[dict], meta: dict[str, tuple[bytes, int]] | None = None) -> bytes:
    """A file with valid CRCs whose tensor entries give their blobs as bytes: offsets, lengths and
    checksums are filled in, so only what the entries declare can be wrong."""
    blobs: list[bytes] = []

    def put(blob: bytes) -> dict:
        blobs.append(blob)
        return {"offset": sum(map(len, blobs[:-1])), "length": len(blob), "crc32": zlib.crc32(blob)}

    entries = [{k: put(v) if isinstance(v, bytes) else v for k, v in t.items()} for t in tensors]
    metas = {name: put(blob) | {"raw_length": raw} for name, (blob, raw) in (meta or {}).items()}
    return _frame({"data_bytes": sum(map(len, blobs)), "tensors": entries, "meta": metas}) + b"".join(blobs)


def _coded(name: str, shape: list[int], values: list[int], counts: list[int], payload: bytes = b"",
           alphabet: int | None = None, table: bytes | None = None) -> dict:
    diffs = np.diff(np.array(values, np.int64), prepend=0) % 2**32
    if table is None:
        table = zlib.compress(diffs.astype("<u4").tobytes() + np.array(counts, "<u4").tobytes())
    return {"kind": "coded", "name": name, "shape": shape, "delta": (0.5).hex(), "symbols": int(np.prod(shape)),
            "alphabet": len(values) if alphabet is None else alphabet, "table": table, "payload": payload}


def _raw(name: str, shape: list[int], payload: bytes, dtype: str = "<f4") -> dict:
    return {"kind": "raw", "name": name, "shape": shape, "dtype": dtype, "payload": payload}


def _bomb(gib: int) -> bytes:
    """A zlib stream of `gib` GiB of zeros in ~1 KB per MiB: one sync-flushed MiB repeats byte for byte."""
    z, c = bytes(2**20), zlib.compressobj(9)
    first, again = (c.compress(z) + c.flush(zlib.Z_SYNC_FLUSH) for _ in range(2))
    return first + again * (1024 * gib - 1)


# Every one has valid checksums; each declares something whose decode would take GiBs, abort
# inside constriction, or read past what the file holds.
CRAFTED = {
    "constant_tensor_of_2e31_codes": lambda: _craft([_coded("c", [2**31], [7], [2**31])]),
    "two_symbols_2e32_codes_in_4_bytes": lambda: _craft(
        [_coded("t", [2**32 - 1], [0, 1], [2**32 - 2, 1], payload=struct.pack("<I", 12345))]),
    "symbols_beyond_uint32": lambda: _craft([_coded("s", [2**33], [0], [0])]),
    "five_max_tensors_beyond_max_elements": lambda: _craft(
        [_coded(f"c{i}", [2**32 - 1], [0], [2**32 - 1]) for i in range(5)]),
    "raw_shape_beyond_payload": lambda: _craft([_raw("r", [2**30], bytes(4))]),
    "empty_shape_whose_dims_overflow": lambda: _craft([_raw("r", [0, 2**62, 2**62], b"")]),
    "hundred_dims": lambda: _craft([_raw("r", [1] * 100, bytes(4))]),
    "alphabet_beyond_its_table": lambda: _craft([_coded("a", [2**24], [0], [2**24], alphabet=2**24 - 2,
                                                        payload=bytes(4))]),
    "alphabet_beyond_ans_model": lambda: _craft([_coded("a", [2**25], [0], [0], alphabet=2**24)]),
    "counts_not_summing_to_shape": lambda: _craft([_coded("c", [4], [0, 1], [1, 1], payload=struct.pack("<I", 9))]),
    "ans_payload_ending_in_zero_word": lambda: _craft([_coded("z", [4], [0, 1], [2, 2], payload=bytes(4))]),
    "payload_not_whole_words": lambda: _craft([_coded("p", [4], [0, 1], [2, 2], payload=bytes(3))]),
    "meta_of_1mb_declaring_1gib": lambda: _craft([], {"model.onnx": (_bomb(1), 2**30)}),
    "meta_zip_bomb_beyond_declared": lambda: _craft([], {"model.onnx": (_bomb(4), 2**20)}),
    "table_zip_bomb_beyond_declared": lambda: _craft([_coded("b", [2**20], [0, 1], [2**20 - 1, 1], table=_bomb(4),
                                                             payload=struct.pack("<I", 77))]),
    "header_beyond_max_header_bytes": lambda: _frame_text(b'{"data_bytes":0,"tensors":[],"meta":{}' +
                                                          b" " * riq.MAX_HEADER_BYTES + b"}"),
    "deeply_nested_header": lambda: _frame_text(b"[" * 100_000 + b"]" * 100_000),
    "header_int_of_5000_digits": lambda: _frame_text(b'{"data_bytes":' + b"9" * 5000 + b',"tensors":[],"meta":{}}'),
}


def test_frame_helper_rewrites_a_real_file_that_still_reads():
    header, start = _split(_sample())

    same = _frame(header) + _sample()[start:]

    _read(same)  # the CRC recomputed by the test matches the reader's


def test_craft_helper_builds_files_the_reader_accepts():
    values, counts = [-2, 0, 5], [1, 6, 1]
    codes = np.array([0, 0, -2, 0, 0, 5, 0, 0], np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        riq.write(Path(tmp) / "ref.riq", [CodedTensor("c", (8,), codes, 0.5)])
        payload = _payload_of(Path(tmp) / "ref.riq")
        (Path(tmp) / "c.riq").write_bytes(_craft([_coded("c", [8], values, counts, payload)]))
        (tensor,), _ = riq.read(Path(tmp) / "c.riq")

    assert tensor.codes.tolist() == codes.tolist()


def _payload_of(path: Path) -> bytes:
    header, start = _split(path.read_bytes())
    blob = header["tensors"][0]["payload"]
    return path.read_bytes()[start + blob["offset"]:start + blob["offset"] + blob["length"]]


# ---- crafted headers, in a child under an address-space limit ----------------------------------

_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])  # riq_format alone, as on a device: no torch, so the baseline stays small
import numpy, constriction, riq_format
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + int(sys.argv[3]), resource.getrlimit(resource.RLIMIT_AS)[1]))
if sys.argv[4] == "without-estimate":  # the backstop: numpy allocates, constriction decodes in chunks
    riq_format._check_memory = lambda header, size: 0
results = {}
for name in sorted(os.listdir(sys.argv[2])):
    start = time.perf_counter()
    try:
        riq_format.read(os.path.join(sys.argv[2], name))
        outcome = ["read", ""]
    except riq_format.RiqFormatError as e:
        outcome = ["RiqFormatError", str(e)]
    except BaseException as e:
        outcome = [type(e).__name__, str(e)[:300]]
    results[name] = outcome + [time.perf_counter() - start]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def crafted_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("crafted")
    for name, build in CRAFTED.items():
        (folder / f"{name}.riq").write_bytes(build())
    (folder / "valid_sample.riq").write_bytes(_sample())
    return folder


@pytest.fixture(scope="module")
def child_runs(crafted_dir) -> dict[str, tuple[subprocess.CompletedProcess, dict]]:
    """mode -> (the child's exit, {file: [outcome, message, seconds]}), each mode run once."""
    runs = {}
    for mode in ("with-estimate", "without-estimate"):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(Path(riq.__file__).parent), str(crafted_dir),
                              str(HEADROOM), mode], capture_output=True, text=True, timeout=120)
        runs[mode] = out, json.loads(out.stdout) if out.returncode == 0 else {}
    return runs


@pytest.mark.parametrize("mode", ["with-estimate", "without-estimate"])
def test_read_refuses_crafted_headers_within_memory_and_time_when_checksums_are_valid(child_runs, mode):
    out, results = child_runs[mode]
    results = dict(results)

    # exited by itself (not -6 = SIGABRT from constriction, not -9 = killed), no traceback
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert results.pop("valid_sample.riq")[0] == "read"  # the limit leaves room for real files
    assert set(results) == {f"{name}.riq" for name in CRAFTED}
    wrong = {name: r for name, r in results.items() if r[0] != "RiqFormatError"}
    assert not wrong  # e.g. MemoryError: a crafted file allocated before it was checked
    slow = {name: r[2] for name, r in results.items() if r[2] > 10}
    assert not slow


def test_read_names_the_memory_limit_when_a_valid_header_needs_more_than_the_process_may_use(child_runs):
    _, results = child_runs["with-estimate"]

    for name in ("constant_tensor_of_2e31_codes", "two_symbols_2e32_codes_in_4_bytes"):
        message = results[f"{name}.riq"][1]
        assert "needs about" in message and "address-space limit" in message and "GiB" in message


def test_read_reports_out_of_memory_instead_of_aborting_when_the_estimate_is_bypassed(child_runs):
    _, results = child_runs["without-estimate"]

    for name in ("constant_tensor_of_2e31_codes", "two_symbols_2e32_codes_in_4_bytes"):
        assert "out of memory while decoding" in results[f"{name}.riq"][1]


@pytest.mark.parametrize("name, expected", [
    ("symbols_beyond_uint32", "symbols must be an int in"),
    ("five_max_tensors_beyond_max_elements", "MAX_ELEMENTS"),
    ("raw_shape_beyond_payload", "bytes for shape (1073741824,)"),
    ("empty_shape_whose_dims_overflow", "non-zero dims"),
    ("hundred_dims", "at most 32 dims"),
    ("alphabet_beyond_its_table", "inflates to at most"),
    ("alphabet_beyond_ans_model", "alphabet must be an int in [0, 16777214]"),
    ("counts_not_summing_to_shape", "positive counts summing to 4"),
    ("ans_payload_ending_in_zero_word", "not valid ANS data"),
    ("payload_not_whole_words", "whole uint32 words"),
    ("meta_of_1mb_declaring_1gib", "MAX_META_BYTES"),
    ("header_beyond_max_header_bytes", "MAX_HEADER_BYTES"),
    ("deeply_nested_header", "not UTF-8 JSON"),
    ("header_int_of_5000_digits", "not UTF-8 JSON"),
])
def test_read_message_names_the_problem_when_a_header_is_crafted(child_runs, crafted_dir, name, expected):
    outcome, message, _ = child_runs["with-estimate"][1][f"{name}.riq"]  # read there: a regression stays bounded

    assert outcome == "RiqFormatError"
    assert expected in message and message.startswith(str(crafted_dir / f"{name}.riq"))


def test_read_stops_inflating_at_the_declared_size_when_a_blob_is_a_zip_bomb(child_runs):
    _, results = child_runs["with-estimate"]  # in the child: without the bound the bomb inflates to 4 GiB

    assert "inflates to a size other than the 1048576 bytes" in results["meta_zip_bomb_beyond_declared.riq"][1]
    assert "inflates to a size other than the 16 bytes" in results["table_zip_bomb_beyond_declared.riq"][1]


_CLI_CHILD = r"""
import resource, sys
from compress.cli import app
import compress.exporters.riq_export  # imported before the limit is set: it is the baseline
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + int(sys.argv[3]), resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.argv = ["compress", "decode", sys.argv[1], "-o", sys.argv[2]]
app()
"""


@pytest.mark.parametrize("name", ["two_symbols_2e32_codes_in_4_bytes", "meta_zip_bomb_beyond_declared", "hundred_dims"])
def test_cli_decode_exits_2_without_traceback_when_the_file_is_crafted(crafted_dir, tmp_path, name):
    out_dir = tmp_path / "decoded"

    out = subprocess.run([sys.executable, "-c", _CLI_CHILD, str(crafted_dir / f"{name}.riq"), str(out_dir), str(HEADROOM)],
                         capture_output=True, text=True, timeout=120)

    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "error:" in out.stderr and name in out.stderr  # the message names the file
    assert "Traceback" not in out.stderr + out.stdout
    assert not out_dir.exists()


# ---- damaged real files --------------------------------------------------------------------------

def _boundaries(data: bytes) -> list[int]:
    """Every field and blob boundary of the layout, and the byte on either side."""
    header, start = _split(data)
    blobs = [e[k] for e in header["tensors"] for k in ("table", "payload") if k in e] + list(header["meta"].values())
    cuts = {0, 4, 6, 10, 14, start} | {start + b["offset"] + d for b in blobs for d in (0, b["length"])}
    return sorted({c + d for c in cuts for d in (-1, 0, 1) if 0 <= c + d < len(data)})


def test_read_refuses_truncation_when_cut_at_any_boundary_or_early_byte():
    data = _sample()
    cuts = sorted(set(range(min(200, len(data)))) | set(_boundaries(data)))
    assert len(cuts) > 220  # the sample has many blobs

    for cut in cuts:
        with pytest.raises(RiqFormatError):
            _read(data[:cut])


@settings(max_examples=300, derandomize=True, deadline=None)
@given(bit=st.integers(min_value=0, max_value=8 * len(_sample()) - 1))
def test_read_refuses_file_when_any_single_bit_is_flipped(bit):
    data = bytearray(_sample())
    data[bit // 8] ^= 1 << (bit % 8)

    with pytest.raises(RiqFormatError):
        _read(bytes(data))


@settings(max_examples=150, derandomize=True, deadline=None)
@given(noise=st.binary(max_size=600), with_prefix=st.booleans())
def test_read_refuses_random_bytes_when_with_or_without_a_valid_prefix(noise, with_prefix):
    data = riq.MAGIC + struct.pack("<H", riq.VERSION) + noise if with_prefix else noise

    with pytest.raises(RiqFormatError):
        _read(data)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(key=st.sampled_from(["shape", "symbols", "alphabet", "raw_length", "dtype", "offset", "length"]),
       value=st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.lists(st.integers(-1, 2**64), max_size=40),
                       st.text(max_size=8), st.none(), st.floats()))
def test_read_refuses_or_matches_the_header_when_a_field_is_rewritten_with_a_valid_crc(key, value):
    header, start = _split(_sample())
    entry = header["meta"]["notes"] if key == "raw_length" else header["tensors"][0 if key != "dtype" else 4]
    (entry["payload"] if key in ("offset", "length") else entry)[key] = value

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "x.riq").write_bytes(_frame(header) + _sample()[start:])
        try:
            tensors, _ = riq.read(Path(tmp) / "x.riq")
        except RiqFormatError:
            return
    # a rewrite that still makes a consistent file (e.g. shape [512] for [32, 16]) reads as declared
    declared = {t["name"]: tuple(t["shape"]) for t in header["tensors"]}
    assert {t.name: t.codes.shape if isinstance(t, CodedTensor) else t.array.shape for t in tensors} == declared


# ---- bounds never refuse what write() writes -----------------------------------------------------

def test_read_accepts_maximally_compressible_tables_and_meta_when_written_by_write(tmp_path):
    codes = np.arange(300_000, dtype=np.int32)  # k = n: a table of steps of 1 and counts of 1, ~1000:1 in zlib
    meta = {"zeros": bytes(20_000_000)}

    stats = riq.write(tmp_path / "m.riq", [CodedTensor("a", codes.shape, codes, 1.0)], meta)
    (tensor,), back = riq.read(tmp_path / "m.riq")

    assert np.array_equal(tensor.codes, codes) and back == meta
    assert stats["meta_bytes"]["zeros"] * 1000 < 20_000_000  # the ratio bound was really exercised


def test_read_accepts_long_runs_coded_in_one_word_when_the_payload_cannot_bound_the_count(tmp_path):
    codes = np.zeros(3_000_000, np.int32)
    codes[0] = 9  # the run of the first symbol at the end costs nothing: the ANS state stays 0

    riq.write(tmp_path / "run.riq", [CodedTensor("run", codes.shape, codes, 1.0)])
    (tensor,), _ = riq.read(tmp_path / "run.riq")

    assert riq.info(tmp_path / "run.riq")["tensors"][0]["payload_bytes"] == 4
    assert np.array_equal(tensor.codes, codes)


def test_read_decodes_bit_exact_when_constriction_is_called_in_many_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(riq, "_CHUNK", 1000)
    codes = np.round(np.random.default_rng(5).laplace(0, 4, (97, 103))).astype(np.int32)

    riq.write(tmp_path / "c.riq", [CodedTensor("c", codes.shape, codes, 0.1)])
    (tensor,), _ = riq.read(tmp_path / "c.riq")

    assert np.array_equal(tensor.codes, codes)


def test_read_refuses_before_decoding_when_the_memory_limit_is_below_the_estimate(tmp_path, monkeypatch):
    riq.write(tmp_path / "m.riq", [CodedTensor("c", (1000,), np.arange(1000) % 7, 0.1)])
    monkeypatch.setattr(riq, "_memory_limit", lambda: (4096, "the test limit allows"))

    with pytest.raises(RiqFormatError, match=r"needs about .* GiB, more than the 0.00 GiB the test limit allows"):
        riq.read(tmp_path / "m.riq")


@pytest.mark.parametrize("constant, value, tensors, meta, message", [
    ("MAX_META_BYTES", 100, [], {"graph": bytes(101)}, "more than MAX_META_BYTES"),
    ("MAX_ELEMENTS", 10, [RawTensor("a", np.zeros(6)), RawTensor("b", np.zeros(5))], {}, "11 elements in all"),
    ("MAX_HEADER_BYTES", 100, [RawTensor("a" * 100, np.zeros(1))], {}, "more than MAX_HEADER_BYTES"),
    ("_MAX_DIMS", 2, [RawTensor("a", np.zeros((1, 1, 1)))], {}, "3 dims"),
])
def test_write_refuses_what_read_would_when_a_bound_is_exceeded(tmp_path, monkeypatch, constant, value, tensors,
                                                                meta, message):
    monkeypatch.setattr(riq, constant, value)  # the real bounds take GiBs to reach

    with pytest.raises(ValueError, match=message):
        riq.write(tmp_path / "m.riq", tensors, meta)

    assert not (tmp_path / "m.riq").exists()


# ---- decode(): graphs, initializers and configs that do not fit ---------------------------------

W_CODES = np.arange(-16, 16, dtype=np.int32).reshape(8, 4)
BIAS = np.linspace(-1, 1, 4).astype(np.float32)


def _graph(op: str = "MatMul", dims: tuple = (8, 4)) -> bytes:
    """Y = X @ W + B with weightless initializers, as export.riq stores a graph."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node(op, ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])]
    inits = [TensorProto(name="W", data_type=TensorProto.FLOAT, dims=list(dims)),
             TensorProto(name="B", data_type=TensorProto.FLOAT, dims=[4])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what this onnxruntime reads
    return model.SerializeToString()


def _onnx_riq(path: Path, tensors=None, **meta) -> Path:
    tensors = [CodedTensor("W", (8, 4), W_CODES, 0.25), RawTensor("B", BIAS)] if tensors is None else tensors
    meta = {"kind": b"onnx", "model.onnx": _graph()} | meta
    riq.write(path, tensors, {k: v for k, v in meta.items() if v is not None})
    return path


def test_decode_onnx_runs_in_onnxruntime_when_the_file_is_valid(tmp_path):
    import onnxruntime as ort

    for weights in ("float", "int8"):
        info = decode(_onnx_riq(tmp_path / "m.riq"), tmp_path / weights, weights)
        sess = ort.InferenceSession(str(tmp_path / weights / "model.onnx"), providers=["CPUExecutionProvider"])
        x = np.ones((1, 8), np.float32)

        y = sess.run(None, {"X": x})[0]

        # int8: onnxruntime fuses DequantizeLinear -> MatMul into an int8 kernel: close, not equal
        atol = 1e-4 if weights == "int8" else 0
        np.testing.assert_allclose(y, x @ (W_CODES * np.float32(0.25)) + BIAS, rtol=1e-6, atol=atol)
        assert info["int8_tensors"] == (1 if weights == "int8" else 0)


@pytest.mark.parametrize("tensors, meta, message", [
    (None, {"model.onnx": b"\xff" * 64}, "ONNX graph (meta 'model.onnx')"),
    (None, {"model.onnx": b""}, "has no nodes"),
    (None, {"model.onnx": None}, "no graph (meta 'model.onnx')"),
    ([CodedTensor("W", (8, 4), W_CODES, 0.25)], {}, "lacks ['B']"),
    ([CodedTensor("W", (8, 4), W_CODES, 0.25), RawTensor("B", BIAS), RawTensor("stray", BIAS)], {},
     "does not name ['stray']"),
    ([CodedTensor("W", (4, 8), W_CODES.reshape(4, 8), 0.25), RawTensor("B", BIAS)], {},
     "'W': (4, 8) float32 in the file, (8, 4)"),
    ([CodedTensor("W", (8, 4), W_CODES, 0.25), RawTensor("B", BIAS.astype(np.int64))], {}, "'B': (4,) int64 in the file"),
    (None, {"model.onnx": _graph(op="NoSuchOp")}, "does not load in onnxruntime"),
    (None, {"kind": b"\xff\xfeonnx"}, "holds no model this version can rebuild"),
])
def test_decode_raises_one_user_error_when_the_onnx_file_does_not_fit(tmp_path, tensors, meta, message):
    path = _onnx_riq(tmp_path / "m.riq", tensors, **meta)

    with pytest.raises(UserError) as e:
        decode(path, tmp_path / "out")

    assert message in str(e.value)
    assert "export.riq" in str(e.value)  # says how to fix it
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, message", [
    (None, "no config.json"),
    (b"{not json", "config.json is not JSON"),
    (b"\xff\xfe\x00", "config.json is not JSON"),
    (b"[1, 2]", "got a JSON list"),
    (b'{"hidden_size": 4}', "got model_type None"),
    (b'{"model_type": "evil", "auto_map": {"AutoModel": "evil.Model"}}', "model_type 'evil'"),
])
def test_decode_raises_one_user_error_when_the_transformers_config_is_bad(tmp_path, config, message):
    meta = {"kind": b"transformers"} | ({} if config is None else {"config.json": config})
    riq.write(tmp_path / "m.riq", [RawTensor("w", np.zeros(3, np.float32))], meta)

    with pytest.raises(UserError) as e:
        decode(tmp_path / "m.riq", tmp_path / "out")

    assert message in str(e.value) and "export.riq" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_bert_container():
    import torch
    from transformers import BertConfig, BertModel

    from compress.exporters.riq_export import module_container

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, architectures=["BertModel"])
    model = BertModel(cfg).eval()
    return module_container(model, {}, cfg.to_json_string())


def test_decode_transformers_loads_when_the_file_is_valid(tmp_path, tiny_bert_container):
    tensors, meta = tiny_bert_container
    riq.write(tmp_path / "m.riq", tensors, meta)

    info = decode(tmp_path / "m.riq", tmp_path / "out")

    assert info["model"] == "." and (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("change, message", [
    ("wrong_shape", "does not load"),
    ("missing_parameter", "encoder.layer.0.output.dense.weight"),
])
def test_decode_raises_one_user_error_when_tensors_do_not_fit_the_config(tmp_path, tiny_bert_container, change, message):
    tensors, meta = tiny_bert_container
    name = "encoder.layer.0.output.dense.weight"
    if change == "wrong_shape":
        tensors = [RawTensor(name, np.zeros((16, 33), np.float32)) if t.name == name else t for t in tensors]
    else:
        tensors = [t for t in tensors if t.name != name]
    riq.write(tmp_path / "m.riq", tensors, meta)

    with pytest.raises(UserError) as e:
        decode(tmp_path / "m.riq", tmp_path / "out")

    assert message in str(e.value) and "export.riq" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("meta", [{"model.onnx": b"\x08\x01garbage"}, {"kind": b"\x80"}])
def test_cli_decode_exits_2_with_one_message_when_the_graph_or_kind_is_crafted(tmp_path, meta):
    path = _onnx_riq(tmp_path / "m.riq", **meta)

    result = CliRunner().invoke(app, ["decode", str(path), "-o", str(tmp_path / "out")])

    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "export.riq" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


# ---- decode(): what `compress run` / `profile` would refuse, and its own arguments (review F4, F12, F13) ----

def _graph_with_shapeless_output() -> bytes:
    """_graph() plus an output whose type has no shape: onnxruntime loads it, onnx.checker (and with it
    `compress profile` and `compress run`) refuses it."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(_graph())
    model.graph.node.append(helper.make_node("Identity", ["Y"], ["Y2"]))
    model.graph.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, None))
    return model.SerializeToString()


def test_decode_refuses_a_graph_that_onnx_checker_refuses_when_onnxruntime_loads_it(tmp_path):
    import onnx
    import onnxruntime as ort

    path = _onnx_riq(tmp_path / "m.riq", **{"model.onnx": _graph_with_shapeless_output()})

    with pytest.raises(UserError) as e:
        decode(path, tmp_path / "out")

    assert "the decoded ONNX model is not valid ONNX (onnx.checker: Field 'shape' of 'type' is required but missing" \
        in str(e.value) and "export.riq" in str(e.value)
    assert not (tmp_path / "out").exists()
    filled = onnx.ModelProto.FromString(_graph_with_shapeless_output())  # the same graph with its weights loads
    filled.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(W_CODES.astype(np.float32), "W"))
    filled.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(BIAS, "B"))
    ort.InferenceSession(filled.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("weights", ["int4", "", None, "FLOAT"])
def test_decode_refuses_weights_it_cannot_give_instead_of_decoding_float(tmp_path, weights):
    with pytest.raises(UserError, match=r"weights must be one of float, int8, packed \(got "):
        decode(_onnx_riq(tmp_path / "m.riq"), tmp_path / "out", weights=weights)

    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 10**6}, "the file's config.json: num_hidden_layers is 1000000 (a real model has 0 to 4,096)"),
    ({"hidden_size": 10**9}, "hidden_size is 1000000000"),
    ({"num_hidden_layers": 500}, "config.json' describes a BertModel of 1,"),  # the built model's count (meta device)
])
def test_decode_refuses_a_torch_config_its_tensors_cannot_fill_before_building_it(tmp_path, tiny_bert_container,
                                                                                   changes, message):
    import time

    tensors, meta = tiny_bert_container
    config = json.loads(meta["config.json"])
    riq.write(tmp_path / "m.riq", tensors, {**meta, "config.json": json.dumps({**config, **changes}).encode()})
    t0 = time.perf_counter()

    with pytest.raises(UserError) as e:
        decode(tmp_path / "m.riq", tmp_path / "out")

    assert message in str(e.value) and "export.riq" in str(e.value)
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "out").exists()
