from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "calib_data" / "demo_cnn.onnx"
DEMO_CALIB = ROOT / "calib_data" / "mnist" / "calib"
DEMO_VAL = ROOT / "calib_data" / "mnist" / "val.parquet"
DEMO_PREPROCESS = ROOT / "calib_data" / "mnist" / "preprocess.json"


@pytest.fixture(scope="session")
def demo_preprocess():
    from quantkit.data import PreprocessSpec

    return PreprocessSpec.load(DEMO_PREPROCESS)


@pytest.fixture(scope="session")
def demo_val(demo_preprocess):
    """The 1,000 validation images (preprocessed) and labels."""
    from quantkit.data import batches, open_source
    from quantkit.model import load_model

    model = load_model(DEMO_MODEL)
    images, labels = [], []
    for batch in batches(open_source(DEMO_VAL, model, demo_preprocess), model, 500):
        images.append(batch.feeds["image"])
        labels += batch.labels
    return np.concatenate(images), np.array(labels)


def float_model(nodes, inputs: dict, outputs: dict, initializers=(), opset: int = 17, name: str = "g") -> onnx.ModelProto:
    """A model from nodes, float32 inputs and outputs given as {name: shape}, and initializers."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_model(channels: int = 3, batch: int | str = "N", constant_branch: bool = False) -> onnx.ModelProto:
    """x[N,C,8,8] -> Conv -> Relu -> Conv -> y; optionally a Mul-by-zero branch feeding the second Conv."""
    rng = np.random.default_rng(1)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [4, channels, 3, 3], rng.normal(size=(4, channels, 3, 3)).astype(np.float32).ravel())
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [2, 4, 1, 1], rng.normal(size=(2, 4, 1, 1)).astype(np.float32).ravel())
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
    ]
    feed = "r1"
    if constant_branch:
        nodes.append(helper.make_node("Mul", ["r1", "zero"], ["zeroed"], name="zero_mul"))
        nodes.append(helper.make_node("Add", ["zeroed", "r1"], ["summed"], name="add"))
        feed = "summed"
    nodes.append(helper.make_node("Conv", [feed, "w2"], ["y"], name="conv2"))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 8, 8])],
        [w1, w2, zero],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def if_model(nested: bool = False) -> onnx.ModelProto:
    """Control flow as exported VADs and merged decoders have it: x -> Conv -> Relu -> h, then an If on
    mean(x) > 0 whose branches read h, and the initializer w2, from the enclosing scope:
    then: Conv -> Relu -> Conv(w_then) -> y; else: Conv -> Relu -> Conv(w2) -> y
    (``nested``: the else branch's second Conv sits in an If of its own, on the condition's negation, whose
    other branch never runs).
    z = Conv(h, w2) is a second output, so w2 has a reader on either side of the If."""
    rng = np.random.default_rng(3)

    def weight(name, shape):
        return numpy_helper.from_array((rng.normal(size=shape) * 0.3).astype(np.float32), name)

    def out(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 2, 16, 16])

    def branch(tag, last):
        """Conv -> Relu -> Conv(last); last None: that Conv (reading the outer w2) inside an If of its own."""
        nodes = [
            helper.make_node("Conv", ["h", f"w_{tag}"], [f"c_{tag}"], pads=[1, 1, 1, 1], name=f"conv_{tag}"),
            helper.make_node("Relu", [f"c_{tag}"], [f"r_{tag}"], name=f"relu_{tag}"),
        ]
        weights = [weight(f"w_{tag}", (8, 8, 3, 3))]
        if last is None:
            inner = helper.make_graph(
                [helper.make_node("Conv", [f"r_{tag}", "w2"], ["y_inner"], name="conv_inner")], "inner", [], [out("y_inner")]
            )
            never = helper.make_graph(  # not_cond is always true here: this branch never runs
                [helper.make_node("Conv", [f"r_{tag}", "w_never"], ["y_never"], name="conv_never")],
                "never",
                [],
                [out("y_never")],
                [weight("w_never", (2, 8, 1, 1))],
            )
            nodes.append(helper.make_node("Not", ["cond"], ["not_cond"], name="not"))
            nodes.append(helper.make_node("If", ["not_cond"], [f"y_{tag}"], name="if_inner", then_branch=inner, else_branch=never))
        else:
            nodes.append(helper.make_node("Conv", [f"r_{tag}", last], [f"y_{tag}"], name=f"conv2_{tag}"))
            if last != "w2":
                weights.append(weight(last, (2, 8, 1, 1)))
        return helper.make_graph(nodes, tag, [], [out(f"y_{tag}")], weights)

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Relu", ["c0"], ["h"], name="relu0"),
        helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
        helper.make_node("Greater", ["m", "zero"], ["cond"], name="greater"),
        helper.make_node(
            "If", ["cond"], ["y"], name="if", then_branch=branch("then", "w_then2"), else_branch=branch("else", None if nested else "w2")
        ),
        helper.make_node("Conv", ["h", "w2"], ["z"], name="conv_z"),
    ]
    graph = helper.make_graph(
        nodes,
        "if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [out("y"), out("z")],
        [weight("w0", (8, 3, 3, 3)), weight("w2", (2, 8, 1, 1)), numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def encoder_model(seq: int = 6, dim: int = 8, vocab: int = 20) -> onnx.ModelProto:
    """A one-head attention block as exported from transformers: int64 ids and mask inputs,
    embedding Gather, LayerNorm, Q/K/V MatMuls, a -3.4e38 additive mask, Softmax."""
    rng = np.random.default_rng(2)

    def w(name, *shape):
        return helper.make_tensor(name, TensorProto.FLOAT, list(shape), rng.normal(size=shape).astype(np.float32).ravel())

    inits = [
        w("emb", vocab, dim), w("wq", dim, dim), w("wk", dim, dim), w("wv", dim, dim), w("wo", dim, dim),
        helper.make_tensor("gamma", TensorProto.FLOAT, [dim], np.ones(dim, np.float32)),
        helper.make_tensor("beta", TensorProto.FLOAT, [dim], np.zeros(dim, np.float32)),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("neg", TensorProto.FLOAT, [], [float(np.finfo(np.float32).min)]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("perm_scale", TensorProto.FLOAT, [], [1.0 / np.sqrt(dim)]),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["hidden"]),
        helper.make_node("LayerNormalization", ["hidden", "gamma", "beta"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "wq"], ["q"]),
        helper.make_node("MatMul", ["ln", "wk"], ["k"]),
        helper.make_node("MatMul", ["ln", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores_raw"]),
        helper.make_node("Mul", ["scores_raw", "perm_scale"], ["scores"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mask_f"], ["inv_mask"]),
        helper.make_node("Mul", ["inv_mask", "neg"], ["mask_bias2"]),
        helper.make_node("Unsqueeze", ["mask_bias2", "axes"], ["mask_bias"]),
        helper.make_node("Add", ["scores", "mask_bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["context"]),
        helper.make_node("MatMul", ["context", "wo"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", dim])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def planted_model(outlier_after: tuple[int, ...] = (2, 4), depth: int = 6) -> onnx.ModelProto:
    """x[N,4,8,8] -> conv1..conv{depth} (ReLU between) -> GlobalAveragePool -> Gemm -> logits[N,10].

    The convs numbered in ``outlier_after`` emit one channel about 1000x larger than the others
    (and the next conv reads it with a tiny weight), so quantizing the *next* conv's input with
    one per-tensor scale crushes every normal channel. Those next convs are the planted
    sensitive nodes, in the middle of the graph.
    """
    rng = np.random.default_rng(7)
    c = 8
    inits, nodes = [], []
    prev = "x"
    for i in range(1, depth + 1):
        cin = 4 if i == 1 else c
        w = rng.normal(0, 1.0 / np.sqrt(cin * 9), size=(c, cin, 3, 3)).astype(np.float32)
        if i in outlier_after:
            w[0] *= 1000.0  # channel 0 of this conv's output becomes huge
        if i - 1 in outlier_after:
            w[:, 0] *= 1e-3  # ... and the next conv reads it with a tiny weight
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, w.shape, w.ravel()))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    wf = rng.normal(0, 0.5, size=(10, c)).astype(np.float32)
    inits.append(helper.make_tensor("wf", TensorProto.FLOAT, wf.shape, wf.ravel()))
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1, name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "planted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def planted_case(tmp, val_samples: int = 384):
    """The planted model saved under ``tmp`` with calib/val .npy files; returns (info, ranges, val batches)."""
    import quantkit
    from quantkit.data import batches, open_source
    from quantkit.model import load_model

    path = save(planted_model(), tmp / "planted.onnx")
    rng = np.random.default_rng(0)
    np.save(tmp / "calib.npy", rng.normal(size=(128, 4, 8, 8)).astype(np.float32))
    np.save(tmp / "val.npy", rng.normal(size=(val_samples, 4, 8, 8)).astype(np.float32))
    info = load_model(path)
    ranges = quantkit.calibrate(path, tmp / "calib.npy", quantkit.CalibrationOptions(methods="minmax")).ranges
    return info, ranges, list(batches(open_source(tmp / "val.npy", info), info, 64))
