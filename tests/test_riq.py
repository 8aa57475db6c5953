"""quant.riq and export.riq on tiny models: the bin-width rule, the k search meets D, the file's
ratio matches its size, decode is bit-exact (float and int8 weights), order and input errors."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from compress import Pipeline
from compress.cli import app
from compress.errors import ConfigError, UserError
from compress.exporters.riq_export import decode
from compress.passes import riq


def _inits(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_bin_width_follows_the_paper_formula():
    # ||w|| = 2, n = 2400, k = 100: 2 * (1/100 + 0.01 * sqrt(24/2400)) = 2 * 0.011 = 0.022
    assert riq.bin_width(2.0, 2400, 100.0) == pytest.approx(0.022, rel=1e-6)


def test_quantize_keeps_zeros_exactly_zero_and_is_codes_times_delta():
    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    w[:, :32] = 0.0
    delta = riq.bin_width(float(np.linalg.norm(w)), w.size, 300.0)

    codes, w_hat = riq.quantize(w, delta)

    assert (codes[:, :32] == 0).all() and (w_hat[:, :32] == 0).all()
    assert np.array_equal(w_hat, codes.astype(np.float32) * delta)
    assert np.abs(w_hat - w).max() <= delta / 2 * (1 + 1e-6)


def test_eligible_tensors_are_float_with_more_than_512_elements_and_2_dims():
    big, bias, small = np.zeros((32, 32), np.float32), np.zeros(2048, np.float32), np.zeros((16, 32), np.float32)

    assert riq.eligible("w", big) and not riq.eligible("b", bias) and not riq.eligible("s", small)
    assert not riq.eligible("ids", np.zeros((32, 32), np.int64))
    assert not riq.eligible("w", big, exclude=["re:^w$"]) and riq.eligible("s", small, include=["s"])


def test_entropy_bits_of_a_uniform_4_symbol_tensor_is_2_bits_each():
    codes = np.tile(np.array([-1, 0, 1, 2], np.int32), 250)

    assert riq.entropy_bits(codes) == pytest.approx(2 * 1000)


@pytest.mark.parametrize("form", ["torch", "onnx"])
def test_riq_search_meets_deviation_and_k_is_smallest_feasible_on_its_grid(form, tiny_bert_sharp, text_file, tmp_path, fast):
    passes = (["export.onnx"] if form == "onnx" else []) + [{"pass": "quant.riq", "deviation": 0.01, "calibration_samples": 8}]

    result = Pipeline(passes).run(str(tiny_bert_sharp), str(text_file), tmp_path / "out", **fast)

    stage = result.report["stages"][-1]
    assert stage["riq"]["calibration_cosine"] >= 0.99
    trace = stage["riq_search"]
    k = stage["riq"]["k"]
    below = [t for t in trace if t["k"] < round(k, 3)]
    assert below and all(t["cosine"] < 0.99 for t in below)  # every coarser k tried was infeasible
    assert stage["fidelity"]["cosine"] > 0.98  # held-out, not the calibration text
    layers = {row["name"]: row for row in stage["riq_layers"]}
    assert len({row["bits_per_weight"] for row in layers.values()}) > 1  # mixed precision


def test_riq_after_prune_zeros_cost_almost_nothing():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    with torch.no_grad():
        model[0].weight[:, 32:] = 0.0  # half the inputs pruned
    x = torch.randn(128, 64)

    def outputs() -> np.ndarray:
        with torch.no_grad():
            return model(x).numpy()

    result = riq.quantize_module(model, outputs, deviation=0.01)

    assert (model[0].weight[:, 32:] == 0).all()
    assert result["calibration_cosine"] >= 0.99
    row = next(r for r in result["layers"] if r["name"] == "0.weight")
    assert row["zeros"] >= 0.5


def test_riq_search_raises_infeasible_when_even_the_finest_bins_miss_d():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    x = torch.randn(32, 64)

    def outputs() -> np.ndarray:
        with torch.no_grad():
            return model(x).numpy()

    with pytest.raises(riq.InfeasibleDeviation, match="raise the deviation D") as err:
        riq.quantize_module(model, outputs, deviation=1e-9)
    assert 0.99 < err.value.best_cosine < 1.0


@pytest.mark.parametrize("form", ["torch", "onnx"])
def test_export_riq_ratio_matches_file_size_and_decode_is_bit_exact(form, tiny_bert, text_file, tmp_path, fast):
    passes = (["export.onnx"] if form == "onnx" else []) + [{"pass": "quant.riq", "calibration_samples": 8}, "export.riq"]
    out = tmp_path / "out"

    result = Pipeline(passes).run(str(tiny_bert), str(text_file), out, **fast)

    info = result.report["stages"][-1]["riq_file"]
    nbytes = (out / "model.riq").stat().st_size
    assert info["bytes"] == nbytes
    assert info["ratio"] == pytest.approx(32 * info["params"] / (8 * nbytes))
    assert info["ratio"] > 4  # 32-bit floats down to a few bits each
    md = (out / "report.md").read_text()
    assert "## RIQ" in md and "bin width" in md and f"{info['ratio']:.2f}x" in md
    decoded = decode(out / "model.riq", tmp_path / "dec")
    if form == "onnx":
        want, got = _inits(out / "model.onnx"), _inits(tmp_path / "dec" / "model.onnx")
    else:
        from safetensors.numpy import load_file

        want, got = load_file(str(out / "model" / "model.safetensors")), load_file(str(tmp_path / "dec" / "model.safetensors"))
        assert (tmp_path / "dec" / "config.json").is_file()
    assert want.keys() == got.keys() and all(want[n].tobytes() == got[n].tobytes() for n in want)
    assert decoded["seconds"] < 30


def test_export_riq_int8_weights_graph_matches_float_decode(tiny_bert, text_file, tmp_path, fast):
    from compress.runtime import OnnxRunner, tokenize
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    Pipeline(["export.onnx", {"pass": "quant.riq", "calibration_samples": 8}, {"pass": "export.riq", "weights": "int8"}]).run(
        str(tiny_bert), str(text_file), out, **fast)
    decode(out / "model.riq", tmp_path / "float")
    feed = tokenize(AutoTokenizer.from_pretrained(tiny_bert), ["the cat sat on the mat", "a second sentence"], 32)

    int8 = OnnxRunner(out / "model.onnx", "encoder").raw(feed)
    ref = OnnxRunner(tmp_path / "float" / "model.onnx", "encoder").raw(feed)

    graph = onnx.load(str(out / "model.onnx")).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) >= 10
    inits, floats = {i.name: numpy_helper.to_array(i) for i in graph.initializer}, _inits(tmp_path / "float" / "model.onnx")
    for node in (n for n in graph.node if n.op_type == "DequantizeLinear"):  # same weights, bit for bit
        q, scale, name = inits.get(node.input[0]), inits[node.input[1]], node.output[0]
        if q is None:  # a table (embeddings): looked up on its codes (Gather), then only those rows dequantized
            gather = next(n for n in graph.node if n.output[0] == node.input[0])
            assert gather.op_type == "Gather"
            q, name = inits[gather.input[0]], gather.input[0].removesuffix("_riq_int8")
        assert q.dtype == np.int8 and np.array_equal(q.astype(np.float32) * scale, floats[name])
    # ORT fuses DequantizeLinear -> MatMul into an 8-bit MatMulNBits computing in int8: close, not equal
    np.testing.assert_allclose(int8["last_hidden_state"], ref["last_hidden_state"], atol=2e-3)
    assert (out / "model.onnx").stat().st_size < 0.5 * (tmp_path / "float" / "model.onnx").stat().st_size


def test_export_riq_without_quant_riq_before_it_is_rejected_before_work(tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match="right after quant.riq"):
        Pipeline(["export.onnx", "export.riq"]).validate(str(tiny_bert))
    with pytest.raises(ConfigError, match="needs the onnx form"):
        Pipeline(["quant.riq", {"pass": "export.riq", "weights": "int8"}]).validate(str(tiny_bert))


def test_cli_decode_of_a_corrupt_file_exits_2_with_one_message(tmp_path):
    bad = tmp_path / "bad.riq"
    bad.write_bytes(b"RIQ\x00" + bytes(range(200)))

    result = CliRunner().invoke(app, ["decode", str(bad), "-o", str(tmp_path / "dec")])

    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "dec").exists()


def test_cli_decode_writes_a_runnable_onnx(tiny_bert, text_file, tmp_path, fast):
    out = tmp_path / "out"
    Pipeline(["export.onnx", {"pass": "quant.riq", "calibration_samples": 8}, "export.riq"]).run(
        str(tiny_bert), str(text_file), out, **fast)

    result = CliRunner().invoke(app, ["decode", str(out / "model.riq"), "-o", str(tmp_path / "dec"), "--weights", "int8"])

    assert result.exit_code == 0, result.output
    assert (tmp_path / "dec" / "tokenizer.json").is_file()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "dec" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {o.name for o in sess.get_outputs()} >= {"last_hidden_state", "sentence_embedding"}
    assert "decoded" in result.output


def test_gptq_rounding_keeps_the_bins_and_loses_less_at_the_same_k(tiny_bert_sharp, text_file):
    """rounding=gptq: the same bin width per tensor, codes chosen with error feedback: at every k the
    calibration cosine is at least nearest rounding's (coarser bins then pass D), and the codes times the bin
    width are the weights the model holds (the decode rule)."""
    import copy

    import torch
    from transformers import AutoModel, AutoTokenizer

    from compress.runtime import TorchRunner, batches

    base = AutoModel.from_pretrained(tiny_bert_sharp).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_sharp)
    feeds = list(batches(tok, text_file.read_text().splitlines()[:16], 64))

    def search(rounding: str):
        model = copy.deepcopy(base)
        run = TorchRunner(model, "encoder")
        outputs = lambda: np.concatenate([run(f) for f in feeds])  # noqa: E731
        params = {n: t for n, t in riq.torch_tensors(model).items() if riq.eligible(n, t.detach().numpy())}
        rounders = riq.gptq_rounders(model, outputs, set(params)) if rounding == "gptq" else {}

        def apply(weights):
            with torch.no_grad():
                for name, w in weights.items():
                    params[name].copy_(torch.from_numpy(w))

        originals = {n: t.detach().numpy().copy() for n, t in params.items()}
        return riq.Search(originals, apply, outputs, 0.01, rounders=rounders), rounders

    nearest, _ = search("nearest")
    gptq, rounders = search("gptq")
    assert rounders and all(name.endswith(".weight") for name in rounders)
    for k in (20.0, 40.0, 80.0):
        assert gptq.cosine(k) >= nearest.cosine(k) - 1e-6
    assert sum(1 - gptq.cosine(k) for k in (20.0, 40.0)) < 0.8 * sum(1 - nearest.cosine(k) for k in (20.0, 40.0))
    weights, deltas, codes = gptq.quantized(40.0)
    name = next(iter(rounders))
    assert np.array_equal(weights[name], codes[name].astype(np.float32) * deltas[name])
    assert not np.array_equal(codes[name], nearest.quantized(40.0)[2][name])  # not nearest rounding


def test_gptq_rounding_after_export_is_refused_before_work(tiny_bert, text_file, tmp_path, fast):
    with pytest.raises(ConfigError, match="rounding=gptq needs the torch form"):
        Pipeline(["export.onnx", {"pass": "quant.riq", "rounding": "gptq"}]).run(str(tiny_bert), str(text_file),
                                                                               tmp_path / "o", **fast)


def test_gptq_rounding_of_a_pruned_cnn_keeps_every_zero_and_lowers_the_error():
    """Conv2d weights go through GPTQ on their input patches; pruned (zero) weights stay exactly zero, so the
    coder still gets them for free."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=2),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10)).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(torch.rand_like(p) > 0.5)  # half of every weight pruned
    x = torch.randn(64, 3, 8, 8) * torch.linspace(0.2, 3, 3)[None, :, None, None]

    def outputs():
        with torch.no_grad():
            return net(x).numpy()

    names = {n for n, p in net.named_parameters() if p.dim() > 1}
    rounders = riq.gptq_rounders(net, outputs, names)
    assert set(rounders) == names
    modules = {f"{n}.weight": m for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0])) for n, m in modules.items()]
    outputs()
    for h in hooks:
        h.remove()
    ratios = []
    for name in sorted(names):
        module, w = modules[name], modules[name].weight.detach().numpy().copy()
        delta = riq.bin_width(float(np.linalg.norm(w)), w.size, np.sqrt(w.size))  # bins about one rms wide
        codes = rounders[name](w, delta)
        assert codes.shape == w.shape and np.all(codes[w == 0] == 0)

        def layer_error(values):  # the layer's own output error on the calibration inputs: what GPTQ minimises
            with torch.no_grad():
                reference = module(inputs[name])
                module.weight.copy_(torch.from_numpy(values))
                error = float((module(inputs[name]) - reference).pow(2).sum())
                module.weight.copy_(torch.from_numpy(w))
            return error

        ratios.append(layer_error(codes.astype(np.float32) * delta) / layer_error(riq.quantize(w, delta)[1]))
    assert max(ratios) < 1 and np.mean(ratios) < 0.8  # measured: 0.99 (3 x 3 x 3 inputs, half pruned), 0.86, 0.37


def test_when_k_lo_meets_d_the_search_goes_below_it_to_the_coarsest_feasible_k():
    """The paper's grid ends at k_lo; a model with room left (here a loose D) is coarsened further while D holds,
    and the k returned is feasible with the next coarser k tried (within 3%) infeasible."""
    rng = np.random.default_rng(0)
    originals = {"w": rng.standard_normal((64, 64)).astype(np.float32)}
    held = {}
    search = riq.Search(originals, held.update, lambda: held.get("w", originals["w"]), deviation=0.95)

    k = search.run()

    k_lo = np.sqrt(originals["w"].size / 24) / (1 - riq.EPS)
    assert k < k_lo and search.feasible(k)
    coarser = [t for t in search.trace if t["k"] < round(k, 3)]
    assert coarser and all(t["cosine"] < 0.05 for t in coarser)
    assert max(t["k"] for t in coarser) > k / 1.031


def test_gptq_hessians_leave_padding_tokens_out():
    """A padded batch's H equals the H of its real tokens alone (the attention mask the model is called with)."""
    import torch

    from compress.passes.lib.gptq import Hessians

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x, attention_mask=None):
            return self.lin(x)

    model = Tiny()
    x = torch.randn(2, 3, 4)
    x[1, 2] = 1000.0  # a padding position
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    hess = Hessians({"lin": model.lin}, root=model)
    model(x, attention_mask=mask)
    hess.close()
    real = x[mask.bool()].double()

    assert torch.allclose(hess.result()["lin"], real.T @ real / 5)


def test_the_search_keeps_the_chosen_ks_quantization_instead_of_rounding_again():
    """quantize_model takes the smallest feasible k's weights and codes from the search: a rounder (GPTQ: the slow
    part) is not called again for it, and what is kept equals a fresh rounding."""
    rng = np.random.default_rng(1)
    originals = {"w": rng.standard_normal((64, 64)).astype(np.float32)}
    held, calls = {}, []

    def rounder(w, delta):
        calls.append(float(delta))
        return np.rint(w / delta).astype(np.int32)

    search = riq.Search(originals, held.update, lambda: held.get("w", originals["w"]), deviation=0.01,
                        rounders={"w": rounder})
    k = search.run()
    before = len(calls)

    weights, deltas, codes = search.result(k)

    assert len(calls) == before and search.feasible(k)
    fresh = search.quantized(k)
    assert np.array_equal(codes["w"], fresh[2]["w"]) and np.array_equal(weights["w"], fresh[0]["w"])
    assert search.result(k * 2)[1]["w"] != deltas["w"]  # any other k: rounded afresh


def _packed_riq(path):
    """A .riq holding Y = ((X @ W4) @ W8) @ W16 + Gather(E4, ids) summed: codes that fit 4, 8 and 16 bits; W4
    has 40 input rows (not a whole number of MatMulNBits blocks); E4 fits 4 bits but is read by a Gather."""
    from onnx import TensorProto, helper

    from compress.exporters import riq_format

    g = np.random.default_rng(0)
    codes = {"W4": g.integers(-8, 8, (40, 24)), "W8": g.integers(-120, 121, (24, 16)),
             "W16": g.integers(-3000, 3001, (16, 8)), "E4": g.integers(-8, 8, (10, 8))}
    codes["W4"][0, 0], codes["W8"][0, 0], codes["W16"][0, 0] = -8, 120, 3000  # each at its width's edge
    deltas = {"W4": 0.05, "W8": 0.01, "W16": 1e-4, "E4": 0.1}
    nodes = [helper.make_node("MatMul", ["X", "W4"], ["A"]), helper.make_node("MatMul", ["A", "W8"], ["B"]),
             helper.make_node("MatMul", ["B", "W16"], ["C"]), helper.make_node("Gather", ["E4", "ids"], ["E"]),
             helper.make_node("Add", ["C", "E"], ["Y"])]
    inits = [TensorProto(name=n, data_type=TensorProto.FLOAT, dims=list(c.shape)) for n, c in codes.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 40]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    riq_format.write(path, [riq_format.CodedTensor(n, c.shape, c.astype(np.int32), deltas[n]) for n, c in codes.items()],
                     {"kind": b"onnx", "model.onnx": model.SerializeToString()})
    return path


def test_packed_decode_keeps_each_tensor_in_the_narrowest_width_and_the_values(tmp_path):
    import onnxruntime as ort

    riq = _packed_riq(tmp_path / "m.riq")
    result = CliRunner().invoke(app, ["decode", str(riq), "-o", str(tmp_path / "packed"), "--weights", "packed"])
    assert result.exit_code == 0, result.output
    assert "1 int4, 2 int8, 1 int16" in result.output
    decode(riq, tmp_path / "float")

    graph = onnx.load(str(tmp_path / "packed" / "model.onnx")).graph
    ops = {n.op_type: n for n in graph.node}
    assert ops["MatMulNBits"].domain == "com.microsoft" and "W4" not in {i.name for i in graph.initializer}
    dtypes = {i.name: i.data_type for i in graph.initializer}
    assert dtypes["W16_riq_int16"] == onnx.TensorProto.INT16 and dtypes["E4_riq_int8"] == onnx.TensorProto.INT8
    feed = {"X": np.random.default_rng(1).standard_normal((2, 40)).astype(np.float32), "ids": np.array([3, 9])}

    def run(folder: str, level: int | None = None):
        options = ort.SessionOptions()
        if level is not None:  # onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits at this level
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        return ort.InferenceSession(str(tmp_path / folder / "model.onnx"), options,
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]

    exact = run("float")
    np.testing.assert_array_equal(run("packed", level=0), exact)  # float compute: the same values exactly
    np.testing.assert_allclose(run("packed"), exact, rtol=0.02, atol=0.02)  # default: int8 activations for int8


def test_packed_decode_of_a_torch_form_file_is_refused(tiny_bert, text_file, tmp_path, fast):
    out = tmp_path / "out"
    Pipeline([{"pass": "quant.riq", "calibration_samples": 8}, "export.riq"]).run(str(tiny_bert), str(text_file), out,
                                                                                  **fast)
    with pytest.raises(UserError, match="packed weights need a model quantized in the onnx form"):
        decode(out / "model.riq", tmp_path / "dec", "packed")
