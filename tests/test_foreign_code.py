"""Foreign code and foreign weights: a model folder's own Python (auto_map) runs only when the user
passes --trust-remote-code, whatever stdin answers; a checkpoint that does not fit its config
(a missing layer, an extra weight) is refused by name instead of loading random weights."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress import models
from compress.cli import app
from compress.errors import ModelLoadError

MARKER = "PWNED"  # written by the folder's custom.py when (and only when) it is imported
CUSTOM_PY = f'''from pathlib import Path

from transformers import BertConfig, BertModel, BertTokenizer

(Path(__file__).parent / "{MARKER}").write_text("custom.py ran")


class MyConfig(BertConfig):
    model_type = "my-bert"


class MyModel(BertModel):
    config_class = MyConfig


class MyTokenizer(BertTokenizer):
    pass
'''
REFUSAL = ("needs its own Python code (auto_map in {file}: {classes}); compress does not run a model folder's "
           "code unless you pass --trust-remote-code (Python: trust_remote_code=True)")


def _custom_folder(tiny_bert: Path, tmp_path: Path, where: str) -> Path:
    """tiny_bert plus custom.py, named by auto_map in config.json, tokenizer_config.json or both."""
    folder = tmp_path / "custom_model"
    shutil.copytree(tiny_bert, folder)
    (folder / "custom.py").write_text(CUSTOM_PY)
    if where in ("config", "both"):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="my-bert", architectures=["MyModel"],
                   auto_map={"AutoConfig": "custom.MyConfig", "AutoModel": "custom.MyModel"})
        (folder / "config.json").write_text(json.dumps(cfg))
    if where in ("tokenizer", "both"):
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": ["custom.MyTokenizer", None]}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


def _env(tmp_path: Path) -> dict:
    """transformers copies a folder's code into its modules cache before importing it: keep that
    cache inside tmp_path so a marker written there is found too."""
    hf = tmp_path / "hf"
    return {**os.environ, "HF_HOME": str(hf), "HF_MODULES_CACHE": str(hf / "modules"), "HF_HUB_OFFLINE": "1"}


def _subprocess(args: list[str], tmp_path: Path) -> tuple[int, str]:
    """A fresh interpreter, with every interactive "trust remote code?" prompt answered yes."""
    proc = subprocess.run(args, input="yes\n" * 20, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=_env(tmp_path))
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines


def _markers(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.rglob(MARKER))


@pytest.mark.parametrize("where, file, classes", [("config", "config.json", "custom.MyConfig, custom.MyModel"),
                                                  ("tokenizer", "tokenizer_config.json", "custom.MyTokenizer")])
@pytest.mark.parametrize("command", ["run", "validate"])
def test_cli_refuses_custom_code_when_folder_has_auto_map(tiny_bert, tmp_path, where, file, classes, command):
    folder = _custom_folder(tiny_bert, tmp_path, where)
    out = tmp_path / "out"
    if command == "run":
        args = ["run", str(folder), "-o", str(out), "--pass", "export.onnx"]
    else:
        (tmp_path / "recipe.yaml").write_text("passes: [export.onnx]\n")
        args = ["validate", str(tmp_path / "recipe.yaml"), "-m", str(folder)]

    code, text = _subprocess([sys.executable, "-m", "compress.cli", *args], tmp_path)

    assert code == 2, text
    assert f"'{folder}' " + REFUSAL.format(file=file, classes=classes) in text
    assert "Traceback" not in text
    assert _markers(tmp_path) == []
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


TRUSTED_RUN = """
import sys
from rich.console import Console
from compress import Pipeline
from compress.profiling import LatencySettings

folder, data, out = sys.argv[1:]
fast = dict(latency=LatencySettings(batch=1, seq=16, threads=1, warmup=1, runs=5), tasks=False, max_length=32,
            console=Console(quiet=True))
result = Pipeline(["export.onnx"]).run(folder, data, out, trust_remote_code=True, **fast)
print("model class", type(result.state.teacher).__name__, "tokenizer class", type(result.state.tokenizer).__name__)
"""


def test_pipeline_runs_custom_code_when_trust_remote_code(tiny_bert, text_file, tmp_path):
    folder = _custom_folder(tiny_bert, tmp_path, "both")

    code, text = _subprocess([sys.executable, "-c", TRUSTED_RUN, str(folder), str(text_file), str(tmp_path / "out")],
                             tmp_path)

    assert code == 0, text
    assert "model class MyModel tokenizer class MyTokenizer" in text
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert _markers(tmp_path), "the folder's code should have run: the user asked for it"


def test_cli_validate_accepts_custom_code_when_trust_remote_code(tiny_bert, tmp_path):
    folder = _custom_folder(tiny_bert, tmp_path, "config")
    (tmp_path / "recipe.yaml").write_text("passes: [export.onnx]\n")

    code, text = _subprocess([sys.executable, "-m", "compress.cli", "validate", str(tmp_path / "recipe.yaml"),
                              "-m", str(folder), "--trust-remote-code"], tmp_path)

    assert code == 0, text
    assert "valid for a encoder (MyModel) model" in text


TRUSTED_STAGE = """
import sys
from pathlib import Path
from compress import data, loading, stages
from compress.errors import ModelLoadError

folder, sdir = sys.argv[1], Path(sys.argv[2])
state = loading.load(folder, loading.describe(folder, trust_remote_code=True), data.load("lee"), trust_remote_code=True)
stages.save(state.with_record({"index": 1}), sdir, "key")  # save_pretrained: auto_map and custom.py come along
print("reloaded", type(stages.load_cached(sdir, "key", state).model).__name__)
try:
    stages.load_cached(sdir, "key", state.with_torch(state.model, trust_remote_code=False))
except ModelLoadError as exc:
    print("untrusted:", exc)
"""


def test_load_cached_reloads_custom_code_stage_when_state_trusts_it(tiny_bert, tmp_path):
    folder = _custom_folder(tiny_bert, tmp_path, "config")
    sdir = tmp_path / "stage"
    sdir.mkdir()

    code, text = _subprocess([sys.executable, "-c", TRUSTED_STAGE, str(folder), str(sdir)], tmp_path)

    assert code == 0, text
    assert "reloaded MyModel" in text  # resume reloads our own stage folder with the run's flag
    assert f"untrusted: '{sdir / 'model'}' needs its own Python code" in text


def test_load_tokenizer_refuses_custom_code_when_given_as_tokenizer_folder(tiny_bert, tmp_path):
    folder = _custom_folder(tiny_bert, tmp_path, "tokenizer")

    with pytest.raises(ModelLoadError, match="auto_map in tokenizer_config.json: custom.MyTokenizer"):
        models.load_tokenizer(folder)
    assert _markers(tmp_path) == []


# --- weights that do not fit their config --------------------------------------------------------

def _rewrite_weights(tiny_bert: Path, tmp_path: Path, change) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file(change(weights), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


def test_cli_run_refuses_checkpoint_when_a_layer_is_missing(tiny_bert, text_file, tmp_path):
    folder = _rewrite_weights(tiny_bert, tmp_path, lambda w: {k: v for k, v in w.items()
                                                              if not k.startswith("encoder.layer.1.")})

    code, text = _cli("run", str(folder), "-o", str(tmp_path / "out"), "--pass", "export.onnx", "--data", str(text_file))

    assert code == 2
    assert (f"'{folder / 'model.safetensors'}' does not fit its config.json: 16 weights missing "
            "(encoder.layer.1.attention.self.query.weight, encoder.layer.1.attention.self.query.bias, "
            "encoder.layer.1.attention.self.key.weight, ...), 0 unexpected; the checkpoint is incomplete "
            "or belongs to another model") in text
    assert not (tmp_path / "out").exists()


def test_cli_run_refuses_checkpoint_when_it_has_an_unexpected_weight(tiny_bert, text_file, tmp_path):
    import torch

    folder = _rewrite_weights(tiny_bert, tmp_path, lambda w: {**w, "encoder.layer.2.output.dense.weight": torch.zeros(4, 4)})

    code, text = _cli("run", str(folder), "-o", str(tmp_path / "out"), "--pass", "export.onnx", "--data", str(text_file))

    assert code == 2
    assert "does not fit its config.json: 0 missing, 1 weight unexpected (encoder.layer.2.output.dense.weight)" in text
    assert not (tmp_path / "out").exists()


def test_load_hf_loads_complete_checkpoints_when_untouched(tiny_bert, tiny_classifier, tiny_llama):
    """The fixtures and the built-in MiniLM load with clean loading info (tied lm_head, position_ids
    buffers and a saved pooler are not reported)."""
    for folder in (tiny_bert, tiny_classifier, tiny_llama, models.alias_path("minilm")):
        model, tok, _ = models.load_hf(folder)
        assert tok is not None
    assert model.pooler is not None  # MiniLM's checkpoint has its pooler: kept


def test_load_hf_drops_pooler_when_encoder_was_saved_without_one(tiny_bert, tmp_path):
    folder = _rewrite_weights(tiny_bert, tmp_path, lambda w: {k: v for k, v in w.items() if not k.startswith("pooler.")})

    model, _, _ = models.load_hf(folder)

    assert model.pooler is None  # no randomly initialised pooler left in the model


def test_load_hf_refuses_classifier_when_its_pooler_is_missing(tiny_classifier, tmp_path):
    folder = _rewrite_weights(tiny_classifier, tmp_path, lambda w: {k: v for k, v in w.items() if ".pooler." not in k})

    with pytest.raises(ModelLoadError, match=r"2 weights missing \(bert\.pooler\.dense\.weight, bert\.pooler\.dense\.bias\)"):
        models.load_hf(folder)


class _Payload:
    """Unpickling this calls open(marker, "w"): what a hostile .bin checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_load_hf_does_not_unpickle_code_when_checkpoint_is_bin(tiny_bert, tmp_path):
    import torch

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"embeddings.word_embeddings.weight": _Payload(tmp_path / MARKER)}, folder / "pytorch_model.bin")

    with pytest.raises(ModelLoadError) as caught:
        models.load_hf(folder)
    assert _markers(tmp_path) == []  # weights_only: the pickle's call was refused, not made
    message = str(caught.value)  # our one line, not torch's advice to load with weights_only=False
    assert message.startswith(f"'{folder / 'pytorch_model.bin'}' holds pickled Python objects besides tensors, which "
                              "safe loading (weights_only) refuses")
    assert "give a folder with model.safetensors" in message and "\n" not in message
    assert "will likely succeed" not in message


def test_load_module_names_weights_when_cnn_checkpoint_does_not_fit(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    from torch import nn

    from compress import images

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4))

    images.save_module(net(), tmp_path / "cnn")
    weights = load_file(str(tmp_path / "cnn" / "model.safetensors"))
    weights.pop("3.weight")
    weights["4.weight"] = torch.zeros(2)
    save_file(weights, str(tmp_path / "cnn" / "model.safetensors"))

    with pytest.raises(ModelLoadError, match=r"1 weight missing \(3\.weight\), 1 weight unexpected \(4\.weight\)"):
        images.load_module(tmp_path / "cnn", model=net())


# --- configs that describe more than their weights hold; mis-shaped weights (review F4, F5) ---------

def _with_config(tiny: Path, tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 10**6}, "config.json: num_hidden_layers is 1000000 (a real model has 0 to 4,096): "
                                   "is the file edited or crafted?"),
    ({"hidden_size": 10**9}, "hidden_size is 1000000000 (a real model has 0 to 131,072)"),
    ({"vocab_size": 10**12, "num_hidden_layers": 10**6}, "vocab_size is 1000000000000"),
    ({"max_position_embeddings": 10**10}, "max_position_embeddings is 10000000000"),
    ({"intermediate_size": -64}, "intermediate_size is -64"),
    ({"num_hidden_layers": 1000}, "config.json' describes at least 7,137,088 parameters (vocab_size 30522, hidden_size 32, "
                                  "num_hidden_layers 1000, num_attention_heads 4, intermediate_size 64, "
                                  "max_position_embeddings 512), but the weight files hold 1,"),
    ({"intermediate_size": 100_000}, "describes at least"),
    ({"max_position_embeddings": 10**6}, "max_position_embeddings 1000000), but the weight files hold"),
])
def test_load_hf_refuses_a_config_its_weights_cannot_fill_before_building_the_model(tiny_bert, tmp_path, changes,
                                                                                      message):
    import time

    folder = _with_config(tiny_bert, tmp_path, **changes)
    t0 = time.perf_counter()

    with pytest.raises(ModelLoadError) as caught:
        models.load_hf(folder)

    assert message in str(caught.value)
    assert time.perf_counter() - t0 < 10  # refused from the numbers: nothing of that size is built


def test_load_hf_counts_the_built_model_when_the_formula_cannot_see_the_extra_size(tiny_llama, tmp_path):
    # key/value projections are hidden x (kv heads x head_dim): outside the lower estimate, in the meta-device count
    folder = _with_config(tiny_llama, tmp_path, num_key_value_heads=4000)

    with pytest.raises(ModelLoadError, match=r"describes a LlamaForCausalLM of 6,065,952 parameters, but the weight "
                                             r"files hold 1,972,001"):
        models.load_hf(folder)


def test_cli_refuses_a_config_of_a_million_layers_in_seconds(tiny_bert, text_file, tmp_path):
    from compress.recipe import default_recipe_path

    folder = _with_config(tiny_bert, tmp_path, num_hidden_layers=10**6)

    for args in (["run", str(folder), "-o", str(tmp_path / "out"), "--pass", "export.onnx", "--data", str(text_file)],
                 ["validate", str(default_recipe_path()), "--model", str(folder)]):
        code, text = _cli(*args)

        assert code == 2 and "num_hidden_layers is 1000000 (a real model has 0 to 4,096)" in text
    assert not (tmp_path / "out").exists()


def test_cli_run_names_the_weight_and_both_shapes_when_a_weight_is_mis_shaped(tiny_bert, text_file, tmp_path):
    name = "encoder.layer.0.attention.self.query.weight"
    folder = _rewrite_weights(tiny_bert, tmp_path, lambda w: {**w, name: w[name][:16].clone()})

    code, text = _cli("run", str(folder), "-o", str(tmp_path / "out"), "--pass", "export.onnx", "--data", str(text_file))

    assert code == 2
    assert (f"'{folder / 'model.safetensors'}' does not fit its config.json: 0 missing, 0 unexpected, 1 weight of "
            f"another shape ({name}: (16, 32) in the checkpoint, (32, 32) by the config)") in text
    assert "ignore_mismatched_sizes" not in text and not (tmp_path / "out").exists()


def test_load_hf_loads_a_bin_checkpoint_of_plain_tensors(tiny_bert, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()

    model, _, _ = models.load_hf(folder)  # counted through a memory-mapped weights_only load, then loaded

    assert sum(p.numel() for p in model.parameters()) == models.weight_file_params([folder / "pytorch_model.bin"])


def _safetensors_header(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


@pytest.mark.parametrize("data, why", [
    (b"not safetensors", "its header length is"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"[1, 2, 3]       ", "its header is not a JSON object"),
    (b"\x40\x00\x00\x00\x00\x00\x00\x00" + b'{"w": {"dtype": "F32", "shape": [1048576, 1048576], "data_offsets": [0, 4]}}'[:64],
     "its header is not JSON"),
    (_safetensors_header({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4]}}) + b"\0" * 4,
     "its header declares 1,099,511,627,776 parameters, more than its 88 bytes can hold"),
])
def test_load_hf_names_a_safetensors_file_whose_header_cannot_be_read(tiny_bert, tmp_path, data, why):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    (folder / "model.safetensors").write_bytes(data)

    with pytest.raises(ModelLoadError, match=f"cannot load the model in '.*': 'model.safetensors' is not a valid "
                                             f"safetensors file \\({why}"):
        models.load_hf(folder)
