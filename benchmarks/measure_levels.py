"""What a measurement level costs: the same run (`compress run MODEL -p export.onnx`) at
`--measure full` and `--measure quick`, each in its own process with the input cache off, then a
second quick run with the cache on (the input stage's measurements reused). Prints the seconds
spent measuring each stage (report.json's `measure_seconds`) and the ratio quick / full.

    python benchmarks/measure_levels.py --model smollm2        # about 20 minutes on 2 cores
    python benchmarks/measure_levels.py --model minilm --passes export.onnx optimize.ort quant.int8

Runs are sequential, never in parallel (they would slow each other down); the ratio is taken
within this one run of the script."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(model: str, passes: list[str], level: str, out: Path, cache: str) -> dict:
    args = [sys.executable, "-m", "compress.cli", "run", model, "--measure", level, "-o", str(out)]
    for p in passes:
        args += ["--pass", p]
    subprocess.run(args, check=True, env={**os.environ, "COMPRESS_CACHE": cache}, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--passes", nargs="+", default=["export.onnx"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = {"full": _run(args.model, args.passes, "full", work / "full", "off"),
                "quick": _run(args.model, args.passes, "quick", work / "quick", "off")}
        _run(args.model, args.passes, "quick", work / "warm", str(work / "cache"))  # fills the cache
        runs["quick, cached input"] = _run(args.model, args.passes, "quick", work / "cached", str(work / "cache"))
    names = [s["name"] for s in runs["full"]["stages"]]
    print(f"| level | {' | '.join(names)} | total measuring s | vs full |")
    print("|---" * (len(names) + 3) + "|")
    full_total = sum(s["measure_seconds"] for s in runs["full"]["stages"])
    for level, rep in runs.items():
        secs = [s["measure_seconds"] for s in rep["stages"]]
        print(f"| {level} | {' | '.join(f'{x:.1f}' for x in secs)} | {sum(secs):.1f} | {sum(secs) / full_total:.2f}x |")
    for level, rep in runs.items():
        fid = [s.get("fidelity") for s in rep["stages"]]
        print(f"{level}: fidelity per stage {fid}; metrics {[s.get('metrics') for s in rep['stages']]}")


if __name__ == "__main__":
    main()
