"""The `.riq` container: RIQ-quantized tensors, entropy-coded with ANS, plus raw tensors and meta blobs.

RIQ (rotation-invariant quantization) stores a tensor as integer codes q and one float32 bin width
delta; the weights are `q.astype(float32) * float32(delta)`, bit for bit (`CodedTensor.weights`).
The codes are compressed with asymmetric numeral systems (ANS) from `constriction`, under an
i.i.d. categorical model over the code values that occur, so a tensor costs about its empirical
entropy (within 1e-6 relative on 12M Laplacian codes) plus a small table of values and counts.

This module is standalone: it imports only the standard library, numpy and constriction (no
torch, no onnx, nothing from `compress`), so it can be copied to a device and used there as is.

Layout (little-endian everywhere):

    offset  size  field
    0       4     magic b"RIQ\\x00"
    4       2     format version, uint16 (1)
    6       4     header length H, uint32
    10      4     CRC32 of bytes 0..9 followed by the header
    14      H     header: UTF-8 JSON, below
    14+H    D     data: every blob back to back, in table order, no gaps; the file ends here

    header = {"data_bytes": D,
              "tensors": [{"kind": "coded", "name": str, "shape": [int], "delta": float.hex of
                           the float32, "symbols": n elements, "alphabet": k distinct codes,
                           "table": blob, "payload": blob},
                          {"kind": "raw", "name": str, "shape": [int], "dtype": "<f4" etc.,
                           "payload": blob}],
              "meta": {name: blob + "raw_length": bytes before zlib}}
    blob = {"offset": from the start of the data, "length": bytes, "crc32": of those bytes}

Coded tensor: table = zlib(uint32[k] sorted distinct values, stored as differences mod 2**32
(values[0], values[1]-values[0], ...) ++ uint32[k] counts); payload = the ANS words (uint32) of
the indices of the codes into the sorted values, or nothing when k <= 1. The model is
`constriction.stream.model.Categorical(counts as float64, perfect=False)` for encoder and decoder
alike, so it is rebuilt exactly from the stored integers; it needs constriction's quantisation
(0.5: 24-bit probabilities, every symbol at least 2**-24, at most 2**24 - 2 symbols) to stay the
same, which the decode checks: the decoded indices must use up the payload and reproduce the counts.
Raw tensor: payload = the array's bytes, C order, little-endian. Meta blob: zlib of the bytes.

Crafted input: a crafted file can carry valid CRCs, so all the header declares is bounded before
anything is allocated from it (else `RiqFormatError`), by bounds no file `write` writes can fail:
the header is at most MAX_HEADER_BYTES (32 MiB, ~100k tensors); shapes have at most 32 dims (numpy
1's limit) and MAX_ELEMENTS in their non-zero dims; raw tensors: elements x itemsize == payload;
zlib blobs inflate to at most 1032x their bytes (deflate's limit; tables: 8 bytes a code), meta to
MAX_META_BYTES (256 MiB), and are inflated with a max_length (a zip bomb stops there). The payload
cannot bound the element count: ANS codes a run of the first symbol at the end for free (the state
stays 0), so 2**32 - 1 codes can take 4 bytes. So a file holds at most MAX_ELEMENTS = 2**34
elements (64 GiB as float32, 2x an 8B-parameter model), and `read` estimates its peak memory (the
file, 8 bytes a code for codes + weights, raw arrays, meta, the largest table) and refuses more than
the hard limits allow: RLIMIT_AS headroom, RAM + swap, cgroup memory.max (never free memory, which
would refuse files that can decode). constriction aborts the process when an allocation fails, so
it decodes 2**20 codes a call into an array numpy allocates (a MemoryError there is reported too).

Speed on 2 CPU cores, 11.7M Laplacian codes (a 30522 x 384 embedding, 4.03 bits each), measured
with time.perf_counter over 3 runs: write 0.15-0.25 s, read 0.32 s; ANS alone encodes in 0.06 s
and decodes in 0.27 s.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import struct
import time
import zlib
from dataclasses import dataclass

try:
    import resource  # Unix only: the address-space limit is one of the memory bounds
except ImportError:  # pragma: no cover - Windows
    resource = None

import constriction
import numpy as np

MAGIC = b"RIQ\x00"
VERSION = 1
_PREFIX = struct.Struct("<4sHII")  # magic, version, header length, header CRC32
_MAX_ALPHABET = 2**24 - 2  # constriction 0.5 Categorical(perfect=False) rejects larger alphabets
_MAX_SYMBOLS = 2**32 - 1  # counts are uint32
MAX_ELEMENTS = 2**34  # per file, coded + raw: 64 GiB as float32 (the docstring says why)
MAX_META_BYTES = 2**28  # inflated bytes of one meta blob (a weightless ONNX graph is a few MB)
MAX_HEADER_BYTES = 2**25
_MAX_DIMS = 32  # numpy 1's limit (numpy 2 allows 64): files stay readable by both
_ZLIB_MAX_RATIO = 1032  # deflate's limit: a 258-byte match in 2 bits (zlib FAQ)
_CHUNK = 2**20  # codes per constriction call (its output is allocated in Rust: failure aborts)
_RAW_DTYPES = {np.dtype(t).newbyteorder("<").str: np.dtype(t) for t in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128")}


class RiqFormatError(ValueError):
    """A .riq file is truncated, corrupted, of another version, internally inconsistent, beyond
    the format's bounds, or too large to decode in this process's memory."""


@dataclass(frozen=True, eq=False)  # eq=False: `==` on numpy arrays has no single truth value
class CodedTensor:
    """A RIQ-quantized tensor: weights = codes * delta."""

    name: str
    shape: tuple[int, ...]
    codes: np.ndarray  # any integer dtype with values in int32 range on write; int32 on read
    delta: float  # stored as float32

    def weights(self) -> np.ndarray:
        return self.codes.astype(np.float32) * np.float32(self.delta)


@dataclass(frozen=True, eq=False)
class RawTensor:
    """A tensor kept as is (biases, norms, small tensors); dtype and shape are preserved."""

    name: str
    array: np.ndarray


def write(path, tensors: list[CodedTensor | RawTensor], meta: dict[str, bytes] | None = None) -> dict:
    """Write atomically (a temp file in the same folder, then os.replace).

    Returns {"file_bytes", "header_bytes", "tensor_bytes": {name: table + payload bytes},
    "meta_bytes": {name: stored bytes}, "seconds"}; file_bytes is the sum of the other sizes."""
    start = time.perf_counter()
    meta = {} if meta is None else meta
    _check_inputs(tensors, meta)
    blobs: list[bytes] = []

    def put(blob: bytes) -> dict:  # appends to the data section; returns the blob's table entry
        blobs.append(blob)
        return {"offset": sum(map(len, blobs[:-1])), "length": len(blob), "crc32": zlib.crc32(blob)}

    entries = [_put_coded(t, put) if isinstance(t, CodedTensor) else _put_raw(t, put) for t in tensors]
    metas = {}
    for name, value in meta.items():
        raw = bytes(value)
        metas[name] = put(zlib.compress(raw, 9)) | {"raw_length": len(raw)}
    header = json.dumps({"data_bytes": sum(map(len, blobs)), "tensors": entries, "meta": metas},
                        separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:  # read() refuses it: fewer tensors per file, or shorter names
        raise ValueError(f"the header would take {len(header)} bytes, more than MAX_HEADER_BYTES = {MAX_HEADER_BYTES}: "
                         "write fewer tensors per file, or shorter names")
    fixed = MAGIC + struct.pack("<HI", VERSION, len(header))
    head = fixed + struct.pack("<I", zlib.crc32(header, zlib.crc32(fixed))) + header

    _write_atomic(os.fspath(path), [head, *blobs])
    sizes = [sum(e[k]["length"] for k in ("table", "payload") if k in e) for e in entries]
    return {"file_bytes": len(head) + sum(map(len, blobs)), "header_bytes": len(head),
            "tensor_bytes": {t.name: s for t, s in zip(tensors, sizes)},
            "meta_bytes": {name: m["length"] for name, m in metas.items()},
            "seconds": time.perf_counter() - start}


def read(path) -> tuple[list[CodedTensor | RawTensor], dict[str, bytes]]:
    """Verify and decode every tensor and meta blob; RiqFormatError names the file and the problem.
    The header and the memory it needs are checked before any payload is read."""
    need = 0
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header, _ = _parse(f, size)
            need = _check_memory(header, size)
            data = memoryview(f.read(header["data_bytes"]))  # _parse leaves f at the data section
        if len(data) != header["data_bytes"]:
            raise RiqFormatError(f"truncated: the data section ends after {len(data)} of {header['data_bytes']} bytes")
        tensors = [_get_coded(t, data) if t["kind"] == "coded" else _get_raw(t, data) for t in header["tensors"]]
        meta = {name: _inflate(_blob(m, data, f"meta {name!r}"), m["raw_length"], f"meta {name!r}")
                for name, m in header["meta"].items()}
    except MemoryError:  # numpy's allocations only (constriction's are chunk-sized): the estimate was short
        raise RiqFormatError(f"{os.fspath(path)}: out of memory while decoding (about {need / 2**30:.2f} GiB "
                             "needed): decode it on a machine with more free memory") from None
    except RiqFormatError as e:
        raise RiqFormatError(f"{os.fspath(path)}: {e}") from None
    return tensors, meta


def decode_weights(path) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
    """name -> weights (float32 codes * delta for coded tensors, the array for raw ones), plus meta."""
    tensors, meta = read(path)
    return {t.name: t.weights() if isinstance(t, CodedTensor) else t.array for t in tensors}, meta


def info(path) -> dict:
    """The header and tensor table, without reading or decoding any payload."""
    try:
        with open(path, "rb") as f:
            header, start = _parse(f, os.fstat(f.fileno()).st_size)
    except RiqFormatError as e:
        raise RiqFormatError(f"{os.fspath(path)}: {e}") from None
    tensors = []
    for t in header["tensors"]:
        n, coded = math.prod(t["shape"]), t["kind"] == "coded"
        stored = t["payload"]["length"] + (t["table"]["length"] if coded else 0)
        tensors.append({"name": t["name"], "kind": t["kind"], "shape": t["shape"],
                        "dtype": "int32" if coded else t["dtype"].name,
                        "delta": t["delta"] if coded else None,
                        "table_bytes": stored - t["payload"]["length"], "payload_bytes": t["payload"]["length"],
                        "symbols": n, "alphabet": t["alphabet"] if coded else None,
                        "bits_per_weight": 8 * stored / n if n else 0.0})
    return {"version": VERSION, "file_bytes": start + header["data_bytes"], "header_bytes": start,
            "tensors": tensors,
            "meta": {name: {"bytes": m["length"], "raw_bytes": m["raw_length"]} for name, m in header["meta"].items()}}


# ---- writing -------------------------------------------------------------------------------------

def _write_atomic(path: str, chunks: list[bytes]) -> None:
    """Readers see the old file or the whole new one, never a partial write."""
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_inputs(tensors, meta) -> None:
    problems, names = [], set()
    for i, t in enumerate(tensors):
        where = f"tensors[{i}]"
        if not isinstance(t, (CodedTensor, RawTensor)):
            problems.append(f"{where} must be a CodedTensor or RawTensor (got {type(t).__name__})")
            continue
        if not isinstance(t.name, str) or not t.name or t.name in names:
            problems.append(f"{where}.name must be a non-empty, unique str (got {t.name!r})")
        names.add(t.name)
        problems += [f"{where} ({t.name!r}): {p}" for p in (
            _coded_problems(t) if isinstance(t, CodedTensor) else _raw_problems(t))]
    total = sum(a.size for a in (getattr(t, "codes", getattr(t, "array", None)) for t in tensors)
                if isinstance(a, np.ndarray))
    if total > MAX_ELEMENTS:
        problems.append(f"{total} elements in all, more than MAX_ELEMENTS = 2**34 per file: "
                        "split the model into several files")
    for name, value in meta.items():
        if not isinstance(name, str) or not isinstance(value, (bytes, bytearray, memoryview)):
            problems.append(f"meta[{name!r}] must map a str to bytes (got {type(value).__name__})")
        elif len(value) > MAX_META_BYTES:
            problems.append(f"meta[{name!r}] has {len(value)} bytes, more than MAX_META_BYTES = {MAX_META_BYTES}")
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in the tensors to write: " + "; ".join(problems))


def _coded_problems(t: CodedTensor) -> list[str]:
    if not isinstance(t.codes, np.ndarray) or t.codes.dtype.kind not in "iu":
        return [f"codes must be an integer numpy array (got {getattr(t.codes, 'dtype', type(t.codes))})"]
    problems = [p for p in [_shape_problem(t.codes.shape)] if p]
    if t.codes.shape != tuple(t.shape):
        problems.append(f"codes.shape {t.codes.shape} != shape {tuple(t.shape)}")
    if t.codes.size and (t.codes.min() < -2**31 or t.codes.max() >= 2**31):
        problems.append(f"codes must fit int32 (got {t.codes.min()}..{t.codes.max()})")
    if t.codes.size > _MAX_SYMBOLS:
        problems.append(f"at most {_MAX_SYMBOLS} codes per tensor (got {t.codes.size})")
    with np.errstate(over="ignore"):
        if not np.isfinite(np.float32(t.delta)):
            problems.append(f"delta must be a finite float32 (got {t.delta})")
    return problems


def _raw_problems(t: RawTensor) -> list[str]:
    dtype = getattr(t.array, "dtype", None)
    if not isinstance(t.array, np.ndarray) or dtype.newbyteorder("<").str not in _RAW_DTYPES:
        return [f"array must be a numpy array of a dtype in {sorted(d.name for d in _RAW_DTYPES.values())} "
                f"(got {dtype or type(t.array).__name__})"]
    return [p for p in [_shape_problem(t.array.shape)] if p]


def _shape_problem(shape: tuple[int, ...]) -> str | None:
    """Shapes both numpy 1 and 2 can hold: numpy refuses even an empty array whose other dims overflow."""
    if len(shape) > _MAX_DIMS:
        return f"shape has {len(shape)} dims, more than {_MAX_DIMS}"
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        return f"shape {tuple(shape)} has more than MAX_ELEMENTS = 2**34 elements in its non-zero dims"
    return None


def _put_coded(t: CodedTensor, put) -> dict:
    values, counts, indices = _alphabet(t.codes.astype(np.int32, copy=False).ravel())
    if len(values) > _MAX_ALPHABET:
        raise ValueError(f"tensor {t.name!r} has {len(values)} distinct codes; the ANS model takes at most "
                         f"{_MAX_ALPHABET}: use fewer quantization levels or keep it as a RawTensor")
    diffs = np.diff(values.astype(np.int64), prepend=0) % 2**32  # small positive steps: zlib packs them well
    table = zlib.compress(diffs.astype("<u4").tobytes() + counts.astype("<u4").tobytes(), 9)
    words = b""
    if len(values) > 1:
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(indices, _model(counts))
        words = coder.get_compressed().astype("<u4").tobytes()
    return {"kind": "coded", "name": t.name, "shape": list(t.codes.shape),
            "delta": float(np.float32(t.delta)).hex(), "symbols": int(t.codes.size),
            "alphabet": len(values), "table": put(table), "payload": put(words)}


def _put_raw(t: RawTensor, put) -> dict:
    dtype = t.array.dtype.newbyteorder("<")
    return {"kind": "raw", "name": t.name, "shape": list(t.array.shape), "dtype": dtype.str,
            "payload": put(np.ascontiguousarray(t.array, dtype=dtype).tobytes())}


def _alphabet(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct codes (int32), how often each occurs (int64), and each code's index (int32)."""
    if codes.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32)
    lo, hi = int(codes.min()), int(codes.max())
    if hi - lo > 4 * codes.size + 2**16:  # too sparse for a histogram: sort (1.4 s for 12M codes)
        values, indices, counts = np.unique(codes, return_inverse=True, return_counts=True)
        return values.astype(np.int32), counts, indices.astype(np.int32)
    offsets = codes - np.int32(lo)  # in [0, hi - lo]: int32 wraps to the right value
    hist = np.bincount(offsets.view(np.uint32))  # O(n): 0.08 s for 12M codes
    present = hist > 0
    index_of = np.cumsum(present, dtype=np.int32) - 1
    return (np.flatnonzero(present) + lo).astype(np.int32), hist[present], index_of[offsets.view(np.uint32)]


def _model(counts: np.ndarray):
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


# ---- reading -------------------------------------------------------------------------------------

def _parse(f, file_size: int) -> tuple[dict, int]:
    """Check prefix, header checksum and table against the file size; return (header, data start)."""
    if file_size == 0:
        raise RiqFormatError("empty file")
    prefix = f.read(_PREFIX.size)
    if prefix[:4] != MAGIC:
        raise RiqFormatError(f"not a .riq file: starts with {prefix[:4]!r}, expected {MAGIC!r}")
    if len(prefix) < _PREFIX.size:
        raise RiqFormatError(f"truncated: {file_size} bytes, shorter than the {_PREFIX.size}-byte prefix")
    _, version, length, crc = _PREFIX.unpack(prefix)
    if version != VERSION:
        newer = " (newer than this reader: update riq_format.py)" if version > VERSION else ""
        raise RiqFormatError(f"format version {version}{newer}; this reader reads version {VERSION}")
    if length > file_size - _PREFIX.size:
        raise RiqFormatError(f"truncated or corrupted: header length {length} > the {file_size - _PREFIX.size} bytes left")
    if length > MAX_HEADER_BYTES:  # checked before reading it: its JSON parses into ~15x as many bytes
        raise RiqFormatError(f"header length {length} is more than MAX_HEADER_BYTES = {MAX_HEADER_BYTES}")
    text = f.read(length)
    if zlib.crc32(text, zlib.crc32(prefix[:10])) != crc:
        raise RiqFormatError("header checksum mismatch: the file is corrupted")
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise RiqFormatError(f"header is not UTF-8 JSON ({e})") from None
    header = _check_header(header)
    start = _PREFIX.size + length
    if start + header["data_bytes"] != file_size:
        raise RiqFormatError(f"file has {file_size} bytes, the header says {start + header['data_bytes']} "
                             f"({'truncated' if file_size < start + header['data_bytes'] else 'trailing bytes'})")
    return header, start


def _fields(d, keys: tuple[str, ...], where: str) -> list:
    if not isinstance(d, dict) or set(d) != set(keys):
        got = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise RiqFormatError(f"inconsistent table: {where} must have the keys {sorted(keys)} (got {got})")
    return [d[k] for k in keys]


def _int(v, where: str, hi: int = 2**63 - 1) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise RiqFormatError(f"inconsistent table: {where} must be an int in [0, {hi}] (got {v!r})")
    return v


def _check_blob(d, where: str, extra: tuple[str, ...] = ()) -> dict:
    values = _fields(d, ("offset", "length", "crc32") + extra, where)
    return {k: _int(v, f"{where}.{k}") for k, v in zip(("offset", "length", "crc32") + extra, values)}


def _check_header(header) -> dict:
    """Types, ranges and blob coverage of the JSON header; returns it with shapes, dtypes, deltas parsed."""
    data_bytes, tensors, metas = _fields(header, ("data_bytes", "tensors", "meta"), "header")
    if not isinstance(tensors, list) or not isinstance(metas, dict):
        raise RiqFormatError("inconsistent table: tensors must be a list and meta a dict")
    tensors = [_check_tensor(t, i) for i, t in enumerate(tensors)]
    if len({t["name"] for t in tensors}) != len(tensors):
        raise RiqFormatError("inconsistent table: tensor names are not unique")
    if (total := sum(math.prod(t["shape"]) for t in tensors)) > MAX_ELEMENTS:
        raise RiqFormatError(f"the tensors have {total} elements in all, more than MAX_ELEMENTS = 2**34")
    metas = {name: _check_meta(m, name) for name, m in metas.items()}
    blobs = [t[k] for t in tensors for k in ("table", "payload") if k in t] + list(metas.values())
    end = 0  # the blobs must tile the data section, so that a CRC covers every byte
    for b in sorted(blobs, key=lambda b: b["offset"]):
        if b["offset"] != end:
            raise RiqFormatError(f"inconsistent table: a blob starts at {b['offset']}, expected {end}")
        end += b["length"]
    if end != _int(data_bytes, "data_bytes"):
        raise RiqFormatError(f"inconsistent table: blobs end at {end}, data_bytes is {data_bytes}")
    return {"data_bytes": data_bytes, "tensors": tensors, "meta": metas}


def _check_meta(m, name: str) -> dict:
    m = _check_blob(m, f"meta[{name!r}]", ("raw_length",))
    if m["raw_length"] > min(MAX_META_BYTES, _ZLIB_MAX_RATIO * m["length"]):
        raise RiqFormatError(f"inconsistent table: meta {name!r} declares {m['raw_length']} bytes inflated from "
                             f"{m['length']}; zlib inflates at most {_ZLIB_MAX_RATIO}x, and meta holds at most "
                             f"MAX_META_BYTES = {MAX_META_BYTES}")
    return m


def _check_tensor(t, i: int) -> dict:
    coding = t.get("kind") if isinstance(t, dict) else None  # the entry's "kind": coded or raw
    keys = {"coded": ("kind", "name", "shape", "delta", "symbols", "alphabet", "table", "payload"),
            "raw": ("kind", "name", "shape", "dtype", "payload")}.get(coding if isinstance(coding, str) else None)
    if keys is None:
        raise RiqFormatError(f"inconsistent table: tensors[{i}].kind must be 'coded' or 'raw' (got {coding!r})")
    e = dict(zip(keys, _fields(t, keys, f"tensors[{i}]")))
    if not isinstance(e["name"], str) or not isinstance(e["shape"], list) or len(e["shape"]) > _MAX_DIMS:
        raise RiqFormatError(f"inconsistent table: tensors[{i}] needs a str name and a list shape of at most "
                             f"{_MAX_DIMS} dims")
    e["shape"] = tuple(_int(s, f"tensors[{i}].shape") for s in e["shape"])
    if _shape_problem(e["shape"]):
        raise RiqFormatError(f"inconsistent table: tensors[{i}]: {_shape_problem(e['shape'])}")
    e["payload"] = _check_blob(e["payload"], f"tensors[{i}].payload")
    n = math.prod(e["shape"])
    if coding == "coded":
        return _check_coded(e, i, n)
    if not isinstance(e["dtype"], str) or e["dtype"] not in _RAW_DTYPES:
        raise RiqFormatError(f"inconsistent table: tensors[{i}].dtype {e['dtype']!r} is not one of {sorted(_RAW_DTYPES)}")
    e["dtype"] = _RAW_DTYPES[e["dtype"]]
    if e["payload"]["length"] != n * e["dtype"].itemsize:
        raise RiqFormatError(f"inconsistent table: tensors[{i}] has {e['payload']['length']} bytes "
                             f"for shape {e['shape']} of {e['dtype'].name}")
    return e


def _check_coded(e: dict, i: int, n: int) -> dict:
    """Symbols match the shape, the table can inflate to the alphabet, the payload fits the coder."""
    e["table"] = _check_blob(e["table"], f"tensors[{i}].table")
    e["delta"] = _delta(e["delta"], i)
    if _int(e["symbols"], f"tensors[{i}].symbols", _MAX_SYMBOLS) != n:
        raise RiqFormatError(f"inconsistent table: tensors[{i}] has {e['symbols']} symbols for shape {e['shape']}")
    k = _int(e["alphabet"], f"tensors[{i}].alphabet", min(n, _MAX_ALPHABET))
    table, words = e["table"]["length"], e["payload"]["length"]
    if 8 * k > _ZLIB_MAX_RATIO * table:  # the table inflates to 8 bytes a symbol
        raise RiqFormatError(f"inconsistent table: tensors[{i}] declares {k} distinct codes, but its {table}-byte "
                             f"table inflates to at most {_ZLIB_MAX_RATIO * table} bytes, not {8 * k}")
    if words % 4 or (k <= 1 and words):
        raise RiqFormatError(f"inconsistent table: tensors[{i}] has a {words}-byte payload for {k} distinct codes "
                             "(whole uint32 words; none for a single code)")
    return e


def _delta(text, i: int) -> float:
    try:
        delta = float.fromhex(text)
    except (TypeError, ValueError):
        delta = math.nan
    if not math.isfinite(delta) or float(np.float32(delta)) != delta:
        raise RiqFormatError(f"inconsistent table: tensors[{i}].delta must be a float32 in float.hex form (got {text!r})")
    return delta


def _blob(b: dict, data: memoryview, what: str) -> memoryview:
    blob = data[b["offset"]:b["offset"] + b["length"]]
    if zlib.crc32(blob) != b["crc32"]:
        raise RiqFormatError(f"{what} fails its CRC32 check: the file is corrupted")
    return blob


def _inflate(blob, raw_length: int, what: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(blob, raw_length + 1)  # bounded: a bad length cannot inflate without limit
    except zlib.error as e:
        raise RiqFormatError(f"{what} is not valid zlib data ({e})") from None
    if len(raw) != raw_length or not inflater.eof:
        raise RiqFormatError(f"{what} inflates to a size other than the {raw_length} bytes in the header")
    return raw


def _get_coded(t: dict, data: memoryview) -> CodedTensor:
    name, k, n = t["name"], t["alphabet"], t["symbols"]
    raw = _inflate(_blob(t["table"], data, f"table of {name!r}"), 8 * k, f"table of {name!r}")
    values = np.cumsum(np.frombuffer(raw, "<u4", k), dtype=np.uint32).view(np.int32)
    counts = np.frombuffer(raw, "<u4", k, 4 * k).astype(np.int64)
    if np.any(np.diff(values.astype(np.int64)) <= 0) or np.any(counts == 0) or counts.sum() != n:
        raise RiqFormatError(f"inconsistent table: the coder table of {name!r} is not sorted distinct values "
                             f"with positive counts summing to {n}")
    words = _blob(t["payload"], data, f"payload of {name!r}")
    if k <= 1:
        return CodedTensor(name, t["shape"], np.full(t["shape"], values[0] if k else 0, np.int32), t["delta"])
    return CodedTensor(name, t["shape"], _ans_decode(words, values, counts, name).reshape(t["shape"]), t["delta"])


def _ans_decode(words: memoryview, values: np.ndarray, counts: np.ndarray, name: str) -> np.ndarray:
    """The codes, decoded _CHUNK at a time into an array numpy allocates: constriction allocates
    each call's output in Rust, where a failed allocation aborts the process instead of raising."""
    n, k = int(counts.sum()), len(counts)
    codes, seen = np.empty(n, np.int32), np.zeros(k, np.int64)
    step = max(_CHUNK, k)  # bincount costs O(k) per call: O(n) in all
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(words, "<u4").astype(np.uint32))
        model = _model(counts)
        for at in range(0, n, step):
            indices = coder.decode(model, min(step, n - at))
            seen += np.bincount(indices, minlength=k)
            codes[at:at + len(indices)] = values[indices]
    except ValueError as e:
        raise RiqFormatError(f"payload of {name!r} is not valid ANS data ({e})") from None
    if not coder.is_empty() or not np.array_equal(seen, counts):
        raise RiqFormatError(f"payload of {name!r} does not decode to its coder table (corrupted, "
                             f"or written with a constriction whose probability quantisation differs)")
    return codes


def _get_raw(t: dict, data: memoryview) -> RawTensor:
    blob = _blob(t["payload"], data, f"payload of {t['name']!r}")
    array = np.frombuffer(blob, t["dtype"]).astype(t["dtype"].newbyteorder("="))  # a writable copy
    return RawTensor(t["name"], array.reshape(t["shape"]))


# ---- memory --------------------------------------------------------------------------------------

def _check_memory(header: dict, file_size: int) -> int:
    """The bytes decoding holds at its peak (the docstring lists them); refuses more than this process can get."""
    coded = [t for t in header["tensors"] if t["kind"] == "coded"]
    need = (file_size + sum(8 * t["symbols"] for t in coded)
            + sum(t["payload"]["length"] for t in header["tensors"] if t["kind"] == "raw")
            + sum(m["raw_length"] for m in header["meta"].values())
            + max((40 * t["alphabet"] + 8 * min(t["symbols"], max(_CHUNK, t["alphabet"])) for t in coded), default=0))
    limit, which = _memory_limit()
    if need > limit:
        raise RiqFormatError(f"decoding it needs about {need / 2**30:.2f} GiB, more than the {limit / 2**30:.2f} GiB "
                             f"{which}: decode it where more memory is available (or, if write() did not "
                             "write it, the file may be crafted)")
    return need


def _memory_limit() -> tuple[float, str]:
    """The most bytes this process can still get, and which limit that is (inf where none is known):
    hard limits only, so no file that could decode here is refused."""
    limits = [(math.inf, "")]
    meminfo = dict(line.split(":", 1) for line in _text("/proc/meminfo").splitlines() if ":" in line)
    if resource is not None and (soft := resource.getrlimit(resource.RLIMIT_AS)[0]) != resource.RLIM_INFINITY:
        used = _text("/proc/self/statm").split()[:1]
        used = int(used[0]) * resource.getpagesize() if used and used[0].isdigit() else 0
        limits.append((soft - used, "this process's address-space limit (ulimit -v) leaves"))
    kib = [meminfo.get("MemTotal", "").split()[:1], meminfo.get("SwapTotal", "0").split()[:1]]
    if all(v and v[0].isdigit() for v in kib):
        limits.append((1024 * sum(int(v[0]) for v in kib), "of RAM + swap"))
    if (cgroup := _text("/sys/fs/cgroup/memory.max").strip()).isdigit():  # "max" when unlimited
        limits.append((int(cgroup), "cgroup memory limit (memory.max) allows"))
    return min(limits)


def _text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
