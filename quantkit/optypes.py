"""Every op-type table quantkit's stages agree on, in one place.

Calibration, Q/DQ placement, FP16 conversion, fusion and tuning each read these; a stage that
needs a new rule adds it here, so two stages never disagree about what an op is.
"""

from __future__ import annotations

#: ops with a weight operand: int8 kernels in TensorRT and onnxruntime
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

#: Ops whose float inputs TensorRT (implicit INT8 or Q/DQ placement) may read in int8: the
#: weighted ops, and the pooling, concat, resize and residual-add ops around them. BatchNorm
#: and activations (ReLU, Clip, and the Add/Mul/Div inside SiLU or hard-swish) are not listed:
#: TensorRT fuses them into the preceding convolution, so the tensors between them disappear
#: and need no range.
QUANTIZABLE_OP_TYPES = frozenset(
    {
        "Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv",
        "Add", "Mul", "Concat", "Resize",
        "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool",
    }
)  # fmt: skip
#: Of these, Add and Mul count only with both operands computed from the inputs: a skip
#: connection, or the product of hard-swish/SiLU/attention gates (onnxruntime's QLinearAdd and
#: QLinearMul); ``x + 3`` inside hard-swish, or a bias add, is part of a fused pointwise epilogue.
RESIDUAL_ONLY_OPS = frozenset({"Add", "Mul"})

#: ops that an int8 kernel absorbs after a weighted op (BN and a constant bias Add fold into it;
#: ReLU and Clip are removed by onnxruntime in front of a QuantizeLinear; Identity is a no-op that
#: every runtime removes, PaddlePaddle's exports put one after each bias Add)
ABSORBED_OPS = frozenset({"BatchNormalization", "Relu", "Clip", "Identity"})
#: absorbed only when the other operand is a constant (a bias)
CONSTANT_OPERAND_OPS = frozenset({"Add"})
#: absorbed only straight after a Conv (before any activation) and with a constant operand: a
#: scale that folds into the conv's weights (TensorRT's scale fusion, ``fold_scales``), as in
#: PP-LCNetV3's learnable affine blocks, Conv -> Mul(a) -> Add(b)
CONV_SCALE_OPS = frozenset({"Mul"})

#: ops onnxruntime's CPU provider runs in int8 when Q/DQ surrounds them (its QDQ selectors,
#: onnxruntime/core/optimizer/qdq_transformer/selectors_actions/qdq_selector_action_transformer.cc):
#: QLinearConv/QLinearMatMul/QGemm, QLinearAdd/QLinearMul (two activations), QLinearConcat,
#: QLinear(Global)AveragePool, and MaxPool and nearest Resize, whose Q/DQ pair is dropped when
#: both share one scale
ORT_INT8_OPS = WEIGHTED_OPS | {"Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize"}
#: of these, the ops onnxruntime runs in int8 only when the output's scale is the input's (it drops
#: the Q/DQ pair around them instead of having a QLinear kernel). Neither leaves its input's range:
#: a max, and a copy of the nearest pixel
ORT_SAME_SCALE_OPS = frozenset({"MaxPool", "Resize"})

#: a model holding any of these is already quantized
ALREADY_QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
        "ConvInteger", "MatMulInteger", "QLinearAdd", "QGemm",
    }
)  # fmt: skip
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

#: ops TensorRT fuses into a preceding weighted op's epilogue (walked when finding the Conv branch of an Add)
EPILOGUE_OPS = frozenset({"BatchNormalization"})

#: ops kept in FP32 by the FP16 conversion whatever the ranges say
FP16_KEEP_FP32_OPS = frozenset(
    {
        # sums of many terms overflow float16 long before their inputs do
        "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceProd", "ReduceLogSum", "ReduceLogSumExp", "CumSum",
        # index / shape / random ops whose float inputs are parameters, not activations
        "Range", "NonMaxSuppression", "TopK", "RoiAlign", "RandomNormal", "RandomUniform", "RandomNormalLike",
        "RandomUniformLike", "Multinomial", "EyeLike",
        # quantization nodes keep their float32 scales
        "QuantizeLinear", "DequantizeLinear",
    }
)  # fmt: skip
#: inputs that the ONNX spec fixes to float32 whatever the op's data type
FLOAT32_ONLY_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}

#: ops whose INT8 error is known to be large: the tuner's optional starting set
KNOWN_SENSITIVE_OPS = frozenset({"Softmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization"})
