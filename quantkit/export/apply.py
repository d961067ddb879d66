"""Applying a precision plan: one model that mixes INT8 (Q/DQ), FP16 and FP32, node by node.

``quantize``, ``sensitivity``, ``tune`` and ``eval`` all build their mixed-precision models here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from quantkit.export.fp16 import Fp16Report, convert_fp16, fp16_precisions
from quantkit.export.qdq import QuantizeReport, quantize_model
from quantkit.model import ModelInfo
from quantkit.options import ExportOptions, given
from quantkit.optypes import QDQ_OPS
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet


@dataclass
class AppliedPlan:
    model: onnx.ModelProto
    quantize: QuantizeReport
    fp16: Fp16Report | None = None  # None when the plan puts no node in FP16


def apply_plan(
    model: ModelInfo,
    ranges: RangeSet,
    plan: PrecisionPlan | None = None,
    options: ExportOptions | None = None,
    *,
    range_aware_fp16: bool = True,
    adjust: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
) -> AppliedPlan:
    """The model with ``plan`` applied: Q/DQ on its int8 nodes, FP16 where it says fp16.

    ``range_aware_fp16``: nodes whose calibrated ranges exceed float16 stay FP32 (off for ranges
    migrated from a TensorRT cache, which hold only the tensors TensorRT calibrated).
    """
    options = given(options, ExportOptions, "options")
    q, report = quantize_model(
        model,
        ranges,
        method=options.method,
        plan=plan,
        target=options.target,
        allow_missing=options.allow_missing,
        weight_bits=options.weight_bits,
        filters=options.filters,
        quantize_attention=options.quantize_attention,
        fmt=options.format,
    )
    if adjust is not None:
        q = adjust(q)
    names = [n.name for n in q.graph.node if n.op_type not in QDQ_OPS]
    if options.high_precision == "fp16":  # a mixed model: float16 wherever the plan does not say fp32
        wanted = {n: "fp32" if plan is not None and plan.precision_of(n) == "fp32" else "fp16" for n in names}
        q, fp16_report = convert_fp16(
            q, precisions=wanted, ranges=ranges if range_aware_fp16 else None, float16_scales=options.target == "tensorrt"
        )
        return AppliedPlan(q, report, fp16_report)
    if plan is None:
        return AppliedPlan(q, report)
    wanted = fp16_precisions(plan, names, set(report.int8_nodes))
    if not any(p == "fp16" for p in wanted.values()):
        return AppliedPlan(q, report)
    q, fp16_report = convert_fp16(
        q, precisions=wanted, ranges=ranges if range_aware_fp16 else None, float16_scales=options.target == "tensorrt"
    )
    return AppliedPlan(q, report, fp16_report)
