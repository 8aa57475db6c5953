"""Running a model in either form on tokenized text, with one output per kind (the kind object,
compress/kinds/, says what: `torch_output` / `onnx_output`):
encoder -> sentence embeddings (batch, hidden), L2-normalised;
classifier -> logits (batch, labels); causal-lm -> logits (batch, seq, vocab);
image-classifier -> logits (batch, classes) of `pixel_values` (batch, 3, H, W) (compress/images.py).
Evaluation, parity checks and profiling all go through these runners, so torch, ONNX and ExecuTorch
(`.pte`, export.executorch) stages are measured the same way. A causal LM graph with a KV cache
(export.onnx cache=true) is fed an empty past, (batch, kv_heads, 0, head_dim), so a whole text is
one prompt step."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from compress import kinds
from compress.kinds import ModelKind

SESSION_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."  # past_key_values.{i}.key -> present.{i}.key
ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def is_past(name: str) -> bool:
    return name.startswith(PAST_PREFIX)


def past_name(present: str) -> str:
    """The input a present output is fed back into at the next step."""
    return PAST_PREFIX + present[len(PRESENT_PREFIX):]


def position_ids(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Positions of the last `new_tokens` columns of a (batch, past + new) mask, as transformers makes
    them for left padding: cumsum(mask) - 1, clipped at 0. Mask [0, 0, 1, 1, 1] -> [0, 0, 0, 1, 2]."""
    pos = np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None).astype(np.int64)
    return pos[:, pos.shape[1] - new_tokens:]


def input_specs(sess: Any) -> dict[str, tuple[tuple, str]]:
    """name -> (shape with symbolic axes as strings, ORT type string) of every graph input."""
    return {i.name: (tuple(i.shape), i.type) for i in sess.get_inputs()}


def empty_past(specs: dict[str, tuple[tuple, str]], batch: int) -> dict[str, np.ndarray]:
    """Zeros of shape (batch, kv_heads, 0, head_dim) for every past_key_values input of `specs`."""
    out = {}
    for name, (shape, type_) in specs.items():
        if not is_past(name):
            continue
        heads, head_dim = (shape[1], shape[3]) if len(shape) == 4 else (None, None)
        if not isinstance(heads, int) or not isinstance(head_dim, int) or type_ not in ORT_FLOATS:
            raise ValueError(f"graph input '{name}' has shape {list(shape)} and type {type_}: expected "
                             "(batch, kv_heads, past_sequence, head_dim) floats with fixed kv_heads and head_dim; "
                             "re-export the model with compress's export.onnx")
        out[name] = np.zeros((batch, heads, 0, head_dim), dtype=ORT_FLOATS[type_])
    return out


def pooling_of(folder: Path | None) -> str:
    """sentence-transformers folders say how to pool in 1_Pooling/config.json; default mean."""
    cfg = folder / "1_Pooling" / "config.json" if folder else None
    if cfg is not None and cfg.is_file():
        try:
            if json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
                return "cls"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            from compress.errors import ModelLoadError

            raise ModelLoadError(f"cannot read {cfg}: {exc}") from None
    return "mean"


def tokenize(tokenizer: Any, texts: list[str], max_length: int, pad_to_max: bool = False) -> dict[str, np.ndarray]:
    enc = tokenizer(list(texts), padding="max_length" if pad_to_max else True, truncation=True,
                    max_length=max_length, return_tensors="np")
    return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def batches(tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 16) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(texts), batch_size):
        yield tokenize(tokenizer, texts[i : i + batch_size], max_length)


def pool(hidden: np.ndarray, mask: np.ndarray, how: str) -> np.ndarray:
    """(batch, seq, hidden) -> (batch, hidden), L2-normalised."""
    if how == "cls":
        emb = hidden[:, 0]
    else:
        m = mask[..., None].astype(hidden.dtype)
        emb = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return emb / np.clip(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12, None)


class TorchRunner:
    """`kind`: a ModelKind or its name."""

    def __init__(self, model: Any, kind: str | ModelKind, pooling: str = "mean"):
        self.model, self.kind, self.pooling = model.eval(), kinds.get(kind), pooling

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.kind.torch_output(self.model, feed, self.pooling)


def session(path: Path, threads: int | None = None, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    # idle sessions' pool threads would spin and take the cores of the session being run: every comparison here
    # holds two or more sessions (measured: a pruned MiniLM int8 that runs in 4.4 ms alone timed at 8.3 ms next to
    # the idle 13 ms reference, 4.5 ms with spinning off in both); alone, a session without spinning is a few
    # percent slower
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def complete_feed(feed: dict[str, np.ndarray], inputs: list[str] | set[str] | dict) -> dict[str, np.ndarray]:
    """The graph's inputs from tokenizer output: extra keys dropped, token types / positions made, and
    an empty KV cache for a cache graph. `inputs`: input names, or `input_specs(session)` (a cache
    graph needs the specs: the empty past takes kv_heads, head_dim and dtype from them)."""
    out = {k: v for k, v in feed.items() if k in inputs}
    if "pixel_values" in feed:  # an image classifier: nothing to make
        return out
    ids = feed["input_ids"]
    if "token_type_ids" in inputs and "token_type_ids" not in out:
        out["token_type_ids"] = np.zeros_like(ids)
    if "position_ids" in inputs and "position_ids" not in out:
        mask = feed.get("attention_mask", np.ones_like(ids))
        out["position_ids"] = position_ids(mask, ids.shape[1])
    missing = [name for name in inputs if is_past(name) and name not in out]
    if missing:
        if not isinstance(inputs, dict):
            raise ValueError(f"the graph has KV cache inputs ({missing[0]}, ...): pass complete_feed the graph's "
                             "input specs (runtime.input_specs(session)), not only their names")
        out.update(empty_past({name: inputs[name] for name in missing}, ids.shape[0]))
    return out


class OnnxRunner:
    """`kind`: a ModelKind or its name."""

    def __init__(self, path: Path | None, kind: str | ModelKind, pooling: str = "mean", threads: int | None = None,
                 sess: Any = None):
        self.sess = sess if sess is not None else session(path, threads)
        self.kind, self.pooling = kinds.get(kind), pooling
        self.specs = input_specs(self.sess)
        self.inputs = list(self.specs)
        self.outputs = [o.name for o in self.sess.get_outputs()]

    @classmethod
    def from_session(cls, sess: Any, kind: str | ModelKind, pooling: str = "mean") -> "OnnxRunner":
        return cls(None, kind, pooling, sess=sess)

    def feed(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return complete_feed(feed, self.specs)

    def raw(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.sess.run(None, self.feed(feed))))

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.kind.onnx_output(self.raw(feed), feed, self.pooling)


class PteRunner:
    """An ExecuTorch program (`.pte`, export.executorch) run by ExecuTorch's own runtime, imported here
    only (compress runs without it). Its inputs in export.executorch's order, `pixel_values` or
    `input_ids`, `attention_mask`; its outputs named as export.onnx names them (`kind.onnx_outputs`).
    The program's memory is planned for its largest batch and length (the sizes its inputs declare):
    a larger batch runs in slices, a longer input is refused. `threads`: the XNNPACK thread pool,
    which ExecuTorch keeps for the whole process."""

    def __init__(self, path: Path, kind: str | ModelKind, pooling: str = "mean", threads: int | None = None):
        from executorch.runtime import Runtime

        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)  # "unsafe" while a method runs on it: none does here
        self.path, self.kind, self.pooling = Path(path), kinds.get(kind), pooling
        self.method = Runtime.get().load_program(self.path).load_method("forward")
        meta = self.method.metadata
        self.limits = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]  # upper bounds
        self.outputs = list(self.kind.onnx_outputs)

    def args(self, feed: dict[str, np.ndarray]) -> tuple:
        import torch

        names = ("pixel_values",) if "pixel_values" in feed else ("input_ids", "attention_mask")
        args = tuple(torch.from_numpy(np.ascontiguousarray(feed[name])) for name in names)
        for name, arg, limit in zip(names, args, self.limits):
            if any(got > most for got, most in zip(arg.shape[1:], limit[1:])):
                raise ValueError(f"{self.path.name} takes {name} of at most {list(limit[1:])} after the batch axis, "
                                 f"got {list(arg.shape[1:])}: export it again with a larger export.executorch "
                                 "max_sequence")
        return args

    def bound(self, feed: dict[str, np.ndarray]) -> Any:
        """One call of the program on this feed, inputs made once (what latency times)."""
        args = self.args(feed)
        return lambda: self.method.execute(args)

    def raw(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args, step = self.args(feed), self.limits[0][0]
        parts = [self.method.execute(tuple(a[i: i + step] for a in args)) for i in range(0, len(args[0]), step)]
        return {name: np.concatenate([part[j].numpy() for part in parts]) for j, name in enumerate(self.outputs)}

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.kind.onnx_output(self.raw(feed), feed, self.pooling)


def runner(state: Any, which: str = "model", threads: int | None = None) -> Any:
    """A runner for the state's current model (`which="model"`) or its teacher."""
    pooling = state.meta.get("pooling", "mean")
    if which == "teacher":
        target = state.teacher
        if isinstance(target, (str, Path)):
            return OnnxRunner(Path(target), state.kind, pooling, threads)
        return TorchRunner(target, state.kind, pooling)
    if state.form == "torch":
        return TorchRunner(state.model, state.kind, pooling)
    if state.form == "pte":
        return PteRunner(state.path, state.kind, pooling, threads)
    return OnnxRunner(state.path, state.kind, pooling, threads)
