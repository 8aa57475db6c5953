"""export.riq: write the entropy-coded `.riq` file of a model quantized by quant.riq, and decode it.

The file (format in `riq_format.py`) holds every tensor of the model: quant.riq's tensors as ANS-
coded integer codes with one bin width each, the rest (biases, norms, small tensors) as raw bytes,
plus what rebuilds a runnable model: the ONNX graph without its weights (onnx form) or the
transformers config (torch form). The pass writes it, reads it back and checks that every decoded
weight is bit-identical to the quantized model's, and reports the compression ratio
(32 x parameters / bits of the file, tables and graph included).

Decoding (`compress decode MODEL.riq -o OUT`, or `decode()` here) gives:
- an ONNX file with float32 weights (`weights="float"`), bit-exact with quant.riq's output, or
- an ONNX file whose tensors with codes in [-127, 127] stay int8 with one scale each, behind a
  weight-only DequantizeLinear (`weights="int8"`): smaller on disk and in memory, same values
  (onnxruntime fuses DequantizeLinear -> MatMul into an 8-bit MatMulNBits, so the weights stay
  int8 at run time; it computes in int8, so outputs differ slightly from the float decode);
- `weights="packed"`: every coded tensor in the narrowest width that holds its codes: a MatMul weight with
  codes in [-8, 7] as a 4-bit MatMulNBits (the bin width as every block's scale, the default zero point 8:
  exact, computed in float), int8 or int16 behind DequantizeLinear (int16: com.microsoft's), float32
  beyond; what stays small in memory at run time;
- a transformers folder (config.json + model.safetensors) for a model quantized in the torch form,
  or a bare model.safetensors state dict for any other torch module (`module_container`).
On a device, `riq_format.decode_weights(path)` needs only numpy and constriction.

A file that was not written by export.riq (crafted, or mismatched) ends in one UserError, before
the output folder appears: riq_format bounds what the file declares; an onnx graph must parse,
name exactly the stored tensors with their dims and dtypes (coded ones as float32), pass onnx.checker
(as every .onnx input of `compress run` / `profile` must) and load in onnxruntime; a transformers config.json must be a JSON object whose model_type transformers knows
(no code from the file ever runs: no auto_map, no trust_remote_code), and the folder must load with
`models.load_hf`, as `compress run` would load it, with every parameter stored."""
from __future__ import annotations

import json
import shutil
import stat
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from compress import outputs
from compress.config import PassConfig
from compress.context import PassContext
from compress.errors import UserError, short, short_path, stat_or_none
from compress.exporters import riq_format
from compress.registry import PassSpec
from compress.report import fmt, mb, stage_label
from compress.state import ModelState

# what decode() can give: float32 weights; int8 codes behind DequantizeLinear where they fit; packed: every coded
# tensor in the narrowest of 4-bit MatMulNBits (MatMul weights), int8, int16 or float32 that holds its codes
WEIGHTS = ("float", "int8", "packed")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "added_tokens.json", "chat_template.jinja")


class ExportRiq(PassConfig):
    pass_name = "export.riq"
    weights: Literal["float", "int8"] = Field(
        "float", description="onnx form: the model the pipeline continues with; int8 keeps codes that fit as int8 "
                             "weights behind DequantizeLinear (smaller in memory), float decodes to float32")


# ---- building the container -------------------------------------------------------------------

def coded_or_raw(name: str, array: np.ndarray, deltas: dict[str, float]):
    """A quantized tensor becomes codes + delta, after checking that codes * delta gives back
    exactly the float weights quant.riq produced (so the file decodes bit-exact)."""
    if name not in deltas:
        return riq_format.RawTensor(name, np.ascontiguousarray(array))
    delta = np.float32(deltas[name])
    codes = np.rint(array.astype(np.float32) / delta).astype(np.int32)
    if not np.array_equal(codes.astype(np.float32) * delta, array.astype(np.float32)) or array.dtype != np.float32:
        raise ValueError(f"tensor '{name}' is not codes x {delta} in float32: was the model changed after quant.riq?")
    return riq_format.CodedTensor(name, tuple(array.shape), codes, float(delta))


def module_container(model, deltas: dict[str, float], config_json: str | None = None) -> tuple[list, dict[str, bytes]]:
    """Every tensor of a torch module (tied ones once); with a transformers config, decode gives
    a folder that `from_pretrained` loads, else a bare safetensors state dict."""
    from compress.passes.riq import torch_tensors

    tensors = [coded_or_raw(n, t.detach().cpu().numpy(), deltas) for n, t in torch_tensors(model).items()]
    if config_json is None:
        return tensors, {"kind": b"state_dict"}
    return tensors, {"kind": b"transformers", "config.json": config_json.encode()}


def _onnx_container(path: Path, deltas: dict[str, float]) -> tuple[list, dict[str, bytes]]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensors = []
    for init in model.graph.initializer:
        tensors.append(coded_or_raw(init.name, numpy_helper.to_array(init), deltas))
        init.CopyFrom(onnx.TensorProto(name=init.name, data_type=init.data_type, dims=list(init.dims)))  # no data
    return tensors, {"kind": b"onnx", "model.onnx": model.SerializeToString()}


# ---- decoding ----------------------------------------------------------------------------------

PACKED_BLOCK = 32  # MatMulNBits block of the packed decode's 4-bit weights (every block has the tensor's one scale)


def _width(t, weights: str) -> str | None:
    """The integer type a coded tensor's codes are kept in: int8 when they fit (weights int8 or packed); packed
    also int4 (codes in [-8, 7]) and int16; None: float32."""
    if not isinstance(t, riq_format.CodedTensor) or weights == "float" or not t.codes.size:
        return None
    lo, hi = int(t.codes.min()), int(t.codes.max())
    widths = ((-8, 7, "int4"), (-127, 127, "int8"), (-32767, 32767, "int16")) if weights == "packed" else \
        ((-127, 127, "int8"),)
    return next((w for low, high, w in widths if low <= lo and hi <= high), None)


def _consumers(graph) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            out.setdefault(name, []).append((node, i))
    return out


def _read_only_as(readers: list[tuple], op_type: str, index: int) -> bool:
    """An initializer with readers, every one of them `op_type` taking it as input `index`."""
    return bool(readers) and all(node.op_type == op_type and i == index for node, i in readers)


def _nbits4(t, uses: list[tuple]) -> tuple[list, dict]:
    """A (K, N) coded weight read only as MatMul's B: 4-bit MatMulNBits codes (code + 8, MatMulNBits' default
    zero point) with the tensor's bin width as every block's scale; its initializers and, by MatMul node, the
    MatMulNBits replacing it (exact: scale * (code + 8 - 8))."""
    from onnx import numpy_helper

    from compress.passes.lib.quantized import matmul_nbits, pack_blocks

    k, n = t.shape
    blocks = -(-k // PACKED_BLOCK)
    packed, _ = pack_blocks((t.codes.T.astype(np.int16) + 8).astype(np.uint8), np.zeros((n, blocks), np.uint8), 4,
                            PACKED_BLOCK)
    base = t.name + "_riq_q4"
    inits = [numpy_helper.from_array(np.ascontiguousarray(packed), base),
             numpy_helper.from_array(np.full((n, blocks), np.float32(t.delta), np.float32), base + "_scales")]
    return inits, {id(node): [matmul_nbits([node.input[0], base, base + "_scales"], node.output[0],
                                           node.name + "_riq_q4", k, n, 4, PACKED_BLOCK, 0)] for node, _ in uses}


def _gather_codes(uses: list[tuple], codes: str, scale: str, domain: str) -> dict:
    """By Gather node: the lookup done on the integer table, then its rows dequantized (the same values as
    dequantizing the table first, without dequantizing the whole table at every run)."""
    from onnx import helper

    out = {}
    for node, _ in uses:
        rows = node.output[0] + "_riq_codes"
        gather = helper.make_node("Gather", [codes, *node.input[1:]], [rows], name=node.name + "_riq", domain=node.domain)
        gather.attribute.extend(node.attribute)
        out[id(node)] = [gather, helper.make_node("DequantizeLinear", [rows, scale], [node.output[0]],
                                                  name=node.name + "_riq_dq", domain=domain)]
    return out


def _fill_graph(graph_bytes: bytes, tensors: list, weights: str):
    """The stored graph with its initializers filled from the file, and how many tensors were kept in each
    integer width. int8 / packed: codes that fit int8 stay int8 behind DequantizeLinear; packed also writes a
    MatMul weight whose codes fit 4 bits as MatMulNBits and codes that fit int16 as int16 behind com.microsoft's
    DequantizeLinear. UserError when the graph does not parse or its initializers do not fit the stored tensors."""
    from onnx import helper, numpy_helper

    model = _parse_graph(graph_bytes)
    by_name = _graph_tensors(model, tensors)
    uses = _consumers(model.graph)
    dq_nodes, inits, replaced = [], [], {}
    widths = dict.fromkeys(("int4", "int8", "int16"), 0)
    for init in model.graph.initializer:
        t, dtype = by_name[init.name]
        width = _width(t, weights)
        readers = uses.get(init.name, [])
        if width == "int4" and len(t.shape) == 2 and _read_only_as(readers, "MatMul", 1):
            more, nodes = _nbits4(t, readers)
            inits += more
            replaced.update(nodes)
            widths["int4"] += 1
            continue
        if width is not None:  # int4 read by anything else stays int8
            store = np.int16 if width == "int16" else np.int8
            q, s = init.name + f"_riq_{np.dtype(store).name}", init.name + "_riq_scale"
            inits += [numpy_helper.from_array(t.codes.astype(store), q),
                      numpy_helper.from_array(np.array(t.delta, dtype=np.float32), s)]
            domain = "com.microsoft" if store == np.int16 else ""
            if _read_only_as(readers, "Gather", 0):
                replaced.update(_gather_codes(readers, q, s, domain))  # a table: only the rows looked up
            else:
                dq_nodes.append(helper.make_node("DequantizeLinear", [q, s], [init.name], name=init.name + "_riq_dq",
                                                 domain=domain))
            widths[np.dtype(store).name] += 1
            continue
        array = t.weights() if isinstance(t, riq_format.CodedTensor) else t.array
        inits.append(numpy_helper.from_array(np.asarray(array).astype(dtype, copy=False), init.name))
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    nodes = dq_nodes + [new for n in model.graph.node for new in replaced.get(id(n), [n])]  # DQ first: still sorted
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    ms = any(n.domain == "com.microsoft" for n in nodes)
    if (dq_nodes or replaced) and not any(o.domain in ("", "ai.onnx") and o.version >= 10 for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", 13))
    if ms and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, widths


def decode(path: Path, outdir: Path, weights: str = "float", overwrite: bool = False) -> dict:
    """Rebuild a runnable model from a .riq file into a new folder (written atomically)."""
    if weights not in WEIGHTS:
        raise UserError(f"weights must be one of {', '.join(WEIGHTS)} (got {short(weights)})")
    path = Path(path).expanduser()
    st = stat_or_none(path)
    if st is None or not stat.S_ISREG(st.st_mode):
        raise UserError(f"'{short_path(path)}' does not exist or is not a file")
    outdir = outputs.claim(outdir, [path], overwrite)  # never the .riq's own folder, the cwd, or a folder not ours
    t0 = time.perf_counter()
    try:
        tensors, meta = riq_format.read(path)
    except riq_format.RiqFormatError as exc:
        raise UserError(str(exc)) from None
    seconds_read = time.perf_counter() - t0
    held = meta.get("kind", b"").decode(errors="replace")  # what the file holds; a crafted value need not be UTF-8
    if held not in ("onnx", "transformers", "state_dict"):
        raise UserError(f"'{path}' holds no model this version can rebuild (kind {held!r}); was it written by export.riq?")
    if held != "onnx" and weights != "float":
        raise UserError(f"{weights} weights need a model quantized in the onnx form (quant.riq after export.onnx); "
                        f"this file holds a torch {held}: decode with --weights float")
    tmp = outputs.fresh_temp(outdir, "decode")
    try:
        info = _write_decoded(tmp, held, tensors, meta, weights)
        for name in TOKENIZER_FILES:  # a run directory keeps the tokenizer beside the file, or in model/
            for src in (path.parent / name, path.parent / "model" / name):
                if src.is_file() and not (tmp / name).exists():
                    shutil.copy2(src, tmp / name)
        outputs.publish(tmp, outdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**info, "kind": held, "outdir": outdir, "read_seconds": seconds_read, "seconds": time.perf_counter() - t0}


def _write_decoded(folder: Path, held: str, tensors: list, meta: dict[str, bytes], weights: str) -> dict:
    """Writes the model into `folder` (a temp folder, renamed by decode() only on success) and
    checks that it loads, so a crafted or mismatched file fails here with a UserError. `held`: the
    file's meta "kind" (onnx, transformers or state_dict)."""
    if held == "onnx":
        import onnx

        if "model.onnx" not in meta:
            raise UserError(f"the file holds an onnx model but no graph (meta 'model.onnx'): {REEXPORT}")
        model, widths = _fill_graph(meta["model.onnx"], tensors, weights)
        onnx.save(model, str(folder / "model.onnx"), save_as_external_data=model.ByteSize() > 1_800_000_000,
                  location="model.onnx.data")
        _check_onnxruntime_loads(folder / "model.onnx")
        _check_onnx_checker(folder / "model.onnx")  # as models.check_onnx: `compress run` / `profile` would refuse it
        return {"model": "model.onnx", "int8_tensors": widths["int8"], "widths": widths}
    from safetensors.numpy import save_file

    config = _config(meta) if held == "transformers" or "config.json" in meta else None
    arrays = {t.name: t.weights() if isinstance(t, riq_format.CodedTensor) else t.array for t in tensors}
    save_file({n: np.ascontiguousarray(a) for n, a in arrays.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    if held == "transformers":
        _check_transformers_loads(folder, tensors)
    return {"model": "." if config is not None else "model.safetensors", "int8_tensors": 0, "widths": {}}


# ---- checking what a file decodes to (a crafted file must end in a UserError, not a traceback) ----

REEXPORT = "was the file written by export.riq? Re-export the model with export.riq"


def _parse_graph(graph_bytes: bytes):
    import onnx

    try:
        model = onnx.ModelProto.FromString(graph_bytes)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: any failure is the file's
        raise UserError(f"the file's ONNX graph (meta 'model.onnx') does not parse ({type(exc).__name__}: "
                        f"{str(exc)[:200]}): {REEXPORT}") from None
    if not model.graph.node:  # protobuf parses many byte strings as an (empty) ModelProto
        raise UserError(f"the file's ONNX graph (meta 'model.onnx', {len(graph_bytes)} bytes) has no nodes: {REEXPORT}")
    return model


def _graph_tensors(model, tensors: list) -> dict[str, tuple]:
    """name -> (stored tensor, numpy dtype of the initializer), once every initializer of the graph
    has a stored tensor of its dims and dtype (coded tensors decode to float32) and nothing is left over."""
    from onnx import helper

    by_name, names = {t.name: t for t in tensors}, [i.name for i in model.graph.initializer]
    missing, extra = [n for n in names if n not in by_name], sorted(set(by_name) - set(names))
    if missing or extra or len(set(names)) != len(names):
        raise UserError(f"the file's tensors do not fit its ONNX graph: the graph names {len(missing)} initializer(s) "
                        f"the file lacks {missing[:3]}, the file holds {len(extra)} the graph does not name {extra[:3]}"
                        f"{', and an initializer name repeats' if len(set(names)) != len(names) else ''}: {REEXPORT}")
    out, problems = {}, []
    for init in model.graph.initializer:
        t = by_name[init.name]
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        except (KeyError, TypeError, ValueError):
            problems.append(f"{init.name!r}: ONNX data type {init.data_type} has no numpy dtype")
            continue
        coded = isinstance(t, riq_format.CodedTensor)
        stored = (tuple(t.shape), np.dtype(np.float32)) if coded else (t.array.shape, t.array.dtype)
        if stored != (tuple(init.dims), dtype):
            problems.append(f"{init.name!r}: {stored[0]} {stored[1]} in the file, {tuple(init.dims)} {dtype} in the graph")
        out[init.name] = (t, dtype)
    if problems:
        raise UserError(f"{len(problems)} stored tensor(s) do not fit the ONNX graph "
                        f"({'; '.join(problems[:3])}): {REEXPORT}")
    return out


def _check_onnx_checker(path: Path) -> None:
    """onnx.checker, as models.check_onnx runs it on every .onnx input: a graph that onnxruntime loads
    but the checker refuses would decode here and then be refused by `compress profile` / `run`."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - ValidationError, protobuf errors: any failure is the file's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the decoded ONNX model is not valid ONNX (onnx.checker: {first[:300]}): {REEXPORT}") from None


def _check_onnxruntime_loads(path: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # loading is the check
    options.log_severity_level = 4  # the error comes back in the exception; keep the terminal for it
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... types
        raise UserError(f"the decoded ONNX model does not load in onnxruntime ({type(exc).__name__}: "
                        f"{str(exc)[:300]}): {REEXPORT}") from None


def _config(meta: dict[str, bytes]) -> dict:
    """config.json parsed without running any code: a JSON object whose model_type transformers knows."""
    if "config.json" not in meta:
        raise UserError(f"the file holds a transformers model but no config.json: {REEXPORT}")
    try:
        cfg = json.loads(meta["config.json"])
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise UserError(f"the file's config.json is not JSON ({str(exc)[:200]}): {REEXPORT}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        got = f"a JSON {type(cfg).__name__}" if not isinstance(cfg, dict) else f"model_type {cfg.get('model_type')!r}"
        raise UserError(f"the file's config.json must be a JSON object with a model_type string (got {got}): {REEXPORT}")
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from compress import models

    try:
        models.check_config_values(cfg, "the file's config.json")  # before the config class builds anything per layer
    except UserError as exc:
        raise UserError(f"{exc}: {REEXPORT}") from None

    if cfg["model_type"] not in CONFIG_MAPPING:  # never auto_map / trust_remote_code: no code from the file runs
        raise UserError(f"the file's config.json names model_type {cfg['model_type']!r}, which this transformers "
                        f"does not know: {REEXPORT}, or update transformers")
    try:
        AutoConfig.for_model(**cfg)
    except Exception as exc:  # noqa: BLE001 - a config class may raise anything on bad values
        raise UserError(f"the file's config.json is not a valid {cfg['model_type']} config ({type(exc).__name__}: "
                        f"{str(exc)[:200]}): {REEXPORT}") from None
    return cfg


def _check_transformers_loads(folder: Path, tensors: list) -> None:
    """Load the decoded folder as `compress run` would (models.load_hf: no remote code, head-pruned
    BERTs rebuilt): a shape that does not fit the config fails there; every parameter must be stored."""
    from transformers.utils import logging as hf_logging

    from compress import models

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report would print a table per mismatch; the error says it
    hf_logging.disable_progress_bar()
    try:
        model, _, _ = models.load_hf(folder)
    except UserError as exc:
        raise UserError(f"the decoded model does not load: {exc}: {REEXPORT}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    stored, tied = {t.name for t in tensors}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.numel():  # a tied parameter is stored under one of its names; empty ones hold nothing
            tied.setdefault(id(p), []).append(name)
    missing = [names[0] for names in tied.values() if not stored & set(names)]
    if missing:
        raise UserError(f"the file lacks {len(missing)} parameter(s) of its {type(model).__name__} ({missing[:3]}), "
                        f"which would load as random weights: {REEXPORT}")


# ---- the pass ----------------------------------------------------------------------------------

def _params(tensors: list) -> int:
    return sum(int(np.prod(t.shape)) if isinstance(t, riq_format.CodedTensor) else t.array.size for t in tensors)


def _verify(path: Path, tensors: list) -> None:
    back, _ = riq_format.read(path)
    want = {t.name: t for t in tensors}
    for t in back:
        a = t.weights() if isinstance(t, riq_format.CodedTensor) else t.array
        w = want[t.name]
        b = w.weights() if isinstance(w, riq_format.CodedTensor) else w.array
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            raise ValueError(f"tensor '{t.name}' does not decode bit-exact from {path.name}")


def run(state: ModelState, cfg: ExportRiq, ctx: PassContext) -> ModelState:
    riq = state.meta.get("riq")
    if not riq or riq.get("form") != state.form:
        raise ValueError("export.riq needs the model quant.riq produced, in the same form: put it right after quant.riq")
    if cfg.weights == "int8" and state.form != "onnx":
        raise ValueError("weights=int8 needs the onnx form (quant.riq after export.onnx)")
    with ctx.console.status("entropy coding the quantized tensors"):
        t0 = time.perf_counter()
        tensors, meta = (_onnx_container(state.path, riq["deltas"]) if state.form == "onnx"
                         else module_container(state.model, riq["deltas"], state.model.config.to_json_string()))
        dst = ctx.workdir / "model.riq"
        riq_format.write(dst, tensors, meta)
        encode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _verify(dst, tensors)
        decode_s = time.perf_counter() - t0
    params, nbytes = _params(tensors), dst.stat().st_size
    ctx.notes["riq_file"] = {"bytes": nbytes, "params": params, "ratio": 32 * params / (8 * nbytes),
                             "bits_per_param": 8 * nbytes / params, "encode_seconds": round(encode_s, 3),
                             "decode_seconds": round(decode_s, 3), "bit_exact": True}
    ctx.console.print(f"    model.riq: {nbytes / 1e6:.2f} MB, ratio {32 * params / (8 * nbytes):.2f}x, "
                      f"encode {encode_s:.1f} s, decode + check {decode_s:.1f} s")
    artifacts = {**state.meta.get("artifacts", {}), "model.riq": str(dst)}
    if state.form == "onnx" and cfg.weights == "int8":
        out = ctx.workdir / "decoded"
        info = decode(dst, out, "int8", overwrite=True)  # a resumed stage may hold its own earlier decode
        ctx.notes["riq_file"]["int8_tensors"] = info["int8_tensors"]
        return state.with_file(out / "model.onnx", "onnx", artifacts=artifacts)
    return replace(state, meta={**state.meta, "artifacts": artifacts})


def _check_order(cfg: ExportRiq, form: str | None, earlier: list) -> list[str]:
    from compress import registry

    changing = [c.pass_name for c in earlier if c is not None and registry.spec_for(c).changes(c)]
    problems = []
    if not changing or changing[-1] != "quant.riq":
        problems.append("export.riq writes what quant.riq quantized: put it right after quant.riq "
                        f"(the model-changing pass before it is {changing[-1] if changing else 'none'})")
    if cfg.weights == "int8" and form not in (None, "onnx"):
        problems.append("weights=int8 needs the onnx form: run quant.riq after export.onnx, or use weights=float")
    return problems


def _report(stage: dict) -> list[str]:
    """report.md's section for the `riq_file` note: the file's size, ratio and coding times."""
    f = stage.get("riq_file")
    if not f:
        return []
    return [f"## RIQ: {stage_label(stage)}", "",
            f"- model.riq: {fmt(mb(f.get('bytes')), '.2f')} MB, compression ratio {fmt(f.get('ratio'), '.2f')}x "
            f"(32 x {fmt(f.get('params'), ',')} params / file bits), encode {fmt(f.get('encode_seconds'), '.2f')} s, "
            f"decode + bit-exact check {fmt(f.get('decode_seconds'), '.2f')} s", ""]


PASS = PassSpec(name="export.riq", config=ExportRiq, run=run, takes=("torch", "onnx"), gives=None,
                changes_model=lambda cfg: cfg.weights == "int8", check_order=_check_order, report=_report,
                summary="Write the entropy-coded .riq file of a quant.riq model (bit-exact decode checked); ratio in the report.")
