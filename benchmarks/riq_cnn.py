"""RIQ on real CNNs, from ONE run on this machine: the paper's VGG setting (a VGG-style CNN on real
MNIST digits, dense and 90% magnitude-pruned) and the pretrained EfficientNet-Lite0 on real photos.

For each model and each deviation D: quant.riq's k search (`compress.passes.riq.quantize_module`;
calibration = logits on training images, never the evaluation ones), then the `.riq` file
(`export.riq`'s container; its decode is checked bit-exact). Ratio = 32 x parameters / bits of the
file (pruned zeros count as parameters, as in the paper's 52.9). Next to it: fp32 safetensors,
zstd-19 of it, and onnxruntime's int8 (dynamic, per-channel) of the ONNX export.
- MNIST VGG: held-out accuracy on 1000 test digits (the paper: dense x19.4, pruned x52.9 with < 0.4
  points of accuracy lost).
- EfficientNet-Lite0: top-1 agreement with fp32 on the 10 colour photos of scikit-learn / scikit-image
  (calibration on their mirror images, so not the evaluated inputs), and mean logit cosine.

    python benchmarks/riq_cnn.py [--deviations 0.005,0.02,0.05] [--rounding nearest,gptq] [--vgg-dir DIR] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def _bytes_zstd(path: Path) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=19).compress(path.read_bytes()))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _fp32_rows(model, example, work: Path, tag: str, score_torch, score_onnx) -> tuple[list[dict], Path]:
    """fp32 safetensors, zstd of it, ORT dynamic int8 per-channel of the ONNX export."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from safetensors.torch import save_file

    from compress.passes.lib.quiet import quiet_root_logger

    st = work / f"{tag}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(st))
    onnx_path, int8_path = work / f"{tag}.onnx", work / f"{tag}_int8.onnx"
    with warnings.catch_warnings(), quiet_root_logger():  # exporter deprecation and quantizer shape chatter
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(onnx_path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
        quantize_dynamic(str(onnx_path), str(int8_path), per_channel=True, weight_type=QuantType.QInt8)
    fp32 = score_torch(model)
    return [{"format": "fp32 safetensors", "bytes": st.stat().st_size, **fp32},
            {"format": "zstd-19 of fp32", "bytes": _bytes_zstd(st), **fp32},
            {"format": "int8 per-channel (ORT dynamic)", "bytes": int8_path.stat().st_size, **score_onnx(int8_path)}], onnx_path


def _riq_row(model, calib, deviation: float, work: Path, tag: str, score_torch, rounding: str = "nearest") -> dict:
    import torch

    from compress.exporters import riq_format
    from compress.exporters.riq_export import module_container
    from compress.passes.riq import InfeasibleDeviation, quantize_module

    m = copy.deepcopy(model).eval()

    def outputs() -> np.ndarray:
        with torch.no_grad():
            return torch.cat([m(xb) for xb in calib.split(256)]).numpy()

    try:
        result = quantize_module(m, outputs, deviation, rounding=rounding)
    except InfeasibleDeviation as exc:  # a finding, not a crash: the row says how close the finest bins came
        return {"format": f"RIQ D={deviation} ({rounding}): infeasible (finest bins: cosine {exc.best_cosine:.4f})"}
    tensors, meta = module_container(m, {n: float(d) for n, d in result["deltas"].items()})
    path = work / f"{tag}_D{deviation}.riq"
    t0 = time.perf_counter()
    stats = riq_format.write(path, tensors, meta)
    t1 = time.perf_counter()
    back, _ = riq_format.decode_weights(path)
    t2 = time.perf_counter()
    state = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    exact = all(back[k].tobytes() == state[k].tobytes() for k in back) and back.keys() <= state.keys()
    label = f"RIQ D={deviation}" + (f" ({rounding})" if rounding != "nearest" else "")
    return {"format": label, "bytes": stats["file_bytes"], "k": result["k"],
            "calibration_cosine": result["calibration_cosine"], "bits_entropy": result["entropy_bits_per_weight"],
            "evaluations": result["evaluations"], "search_s": result["search_seconds"], "encode_s": t1 - t0,
            "decode_s": t2 - t1, "bit_exact": exact, **score_torch(m)}


def mnist_vgg(args, work: Path) -> dict[str, list[dict]]:
    from compress.fixtures import mnist_vgg as mv

    if args.vgg_dir is None or not (args.vgg_dir / "vgg_pruned.safetensors").is_file():
        args.vgg_dir = work / "mnist_vgg"
        mv.print_summary(mv.build(args.vgg_dir))  # torch threads: --threads, set in main
    x_tr, y_tr, x_te, y_te = mv.load_mnist(0)
    calib = x_tr[:512]

    def score_torch(model) -> dict:
        return {"accuracy": mv.accuracy(model, x_te, y_te)}

    def score_onnx(path: Path) -> dict:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = np.concatenate([sess.run(None, {"x": xb.numpy()})[0] for xb in x_te.split(250)])
        return {"accuracy": float((logits.argmax(-1) == y_te.numpy()).mean())}

    out = {}
    for variant in ("dense", "pruned"):
        model = mv.load_vgg(args.vgg_dir / f"vgg_{variant}.safetensors")
        rows, _ = _fp32_rows(model, x_te[:2], work, f"vgg_{variant}", score_torch, score_onnx)
        rows += [_riq_row(model, calib, d, work, f"vgg_{variant}_{r}", score_torch, r)
                 for r in args.rounding for d in args.deviations]
        out[f"MNIST VGG {variant}"] = _with_ratios(rows, _params(model))
        print_table(f"MNIST VGG {variant}", out[f"MNIST VGG {variant}"])
    return out


def efficientnet(args, work: Path) -> dict[str, list[dict]]:
    import torch

    from compress.fixtures import efficientnet_photos as ei

    model = ei.load_efficientnet_lite0()
    x, names = ei.load_images()
    calib = torch.flip(x, dims=[3])  # mirror images: calibration never sees the evaluated inputs
    with torch.no_grad():
        ref = model(x).numpy()

    def score(logits: np.ndarray) -> dict:
        from compress.passes.riq import row_cosines

        return {"top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
                "logit_cosine": float(row_cosines(logits, ref).mean())}

    def score_torch(m) -> dict:
        with torch.no_grad():
            return score(m(x).numpy())

    def score_onnx(path: Path) -> dict:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return score(sess.run(None, {"x": x.numpy()})[0])

    rows, _ = _fp32_rows(model, x[:1], work, "effnet_lite0", score_torch, score_onnx)
    rows += [_riq_row(model, calib, d, work, f"effnet_lite0_{r}", score_torch, r)
             for r in args.rounding for d in args.deviations]
    name = f"EfficientNet-Lite0 ({len(names)} photos)"
    print_table(name, _with_ratios(rows, _params(model)))
    return {name: rows}


def _with_ratios(rows: list[dict], params: int) -> list[dict]:
    for r in rows:
        r.update(params=params, ratio=32 * params / (8 * r["bytes"]) if "bytes" in r else None)
    return rows


def print_table(model: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(r: dict, key: str, spec: str) -> str:
        return format(r[key], spec) if r.get(key) is not None else "-"

    metric = "accuracy" if "accuracy" in rows[0] else "top1_agreement"
    base = rows[0][metric]
    table = Table("format", "KB", "ratio", metric.replace("_", " "), "change (points)", "k", "calib cos",
                  "evals", "search s", "encode s", "decode s", "bit-exact",
                  title=f"{model}: {rows[0]['params']:,} params (ratio = 32 x params / file bits)")
    for r in rows:
        change = f"{100 * (r[metric] - base):+.2f}" if metric in r else "-"
        table.add_row(r["format"], f"{r['bytes'] / 1e3:.1f}" if "bytes" in r else "-", fmt(r, "ratio", ".2f"),
                      fmt(r, metric, ".4f"), change, fmt(r, "k", ".0f"), fmt(r, "calibration_cosine", ".4f"),
                      str(r.get("evaluations", "-")), fmt(r, "search_s", ".1f"), fmt(r, "encode_s", ".3f"),
                      fmt(r, "decode_s", ".3f"), str(r.get("bit_exact", "-")))
    Console(width=170).print(table)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deviations", default="0.005,0.02,0.05", help="comma-separated D values")
    ap.add_argument("--vgg-dir", type=Path, default=None, help="folder from examples/mnist_vgg.py (else trained here)")
    ap.add_argument("--rounding", default="nearest", help="comma-separated quant.riq roundings: nearest (the paper), "
                                                          "gptq (GPTQ's codes onto the same bins)")
    ap.add_argument("--skip-vgg", action="store_true")
    ap.add_argument("--skip-efficientnet", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    args.deviations = [float(d) for d in args.deviations.split(",")]
    args.rounding = [r for r in args.rounding.split(",") if r]

    import torch

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-riq-cnn-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {} if args.skip_vgg else mnist_vgg(args, work)
    if not args.skip_efficientnet:
        results.update(efficientnet(args, work))

    (work / "riq_cnn.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"json: {work / 'riq_cnn.json'}")
    return results


if __name__ == "__main__":
    main()
