"""The Python front door: the same pipeline as the default recipe, built from config objects.

    python examples/python_pipeline.py -o out/python-minilm            # built-in MiniLM
    python examples/python_pipeline.py --model path/to/hf_folder --data my.txt -o out/x
"""
from __future__ import annotations

import argparse

from compress import Pipeline
from compress.exporters import ExportOnnx, OptimizeOrt
from compress.passes import Profile, QuantInt8


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="transformers folder, .onnx file or alias")
    ap.add_argument("--data", default=None, help="text / .jsonl file or built-in corpus (wiki, lee)")
    ap.add_argument("-o", "--output", required=True, help="output directory")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--fast", action="store_true", help="few timing runs and no task metrics (for tests)")
    args = ap.parse_args(argv)

    pipeline = Pipeline([ExportOnnx(), OptimizeOrt(), QuantInt8(per_channel=True), Profile(runs=5 if args.fast else 50)])
    result = pipeline.run(args.model, args.data, args.output, overwrite=args.overwrite, tasks=not args.fast)
    final, first = result.report["stages"][-1], result.report["stages"][0]
    print(f"{first['bytes'] / 1e6:.1f} MB -> {final['bytes'] / 1e6:.1f} MB, held-out fidelity {final['fidelity']}")
    return result.report


if __name__ == "__main__":
    main()
