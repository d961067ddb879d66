"""``build``: a TensorRT engine (10.x/11.x), or an optimized onnxruntime model.

For TensorRT, the trtexec lines of both major versions are always written beside the output
(``<output>.trtexec.sh``), so a model quantized here can be built on a GPU machine. Where
TensorRT is not installed, ``EngineNotBuilt`` carries those lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from quantkit._io import check_output_file, write_bytes_atomic
from quantkit.backends.ort import OrtBuild, build_ort
from quantkit.backends.trt import INSTALL_HINT, BuildResult, build_engine, tensorrt_version
from quantkit.backends.trtexec import (
    QDQ_BUILD_NOTES,
    QdqFacts,
    ShapeProfile,
    check_build_request,
    check_qdq_for_tensorrt,
    has_float16,
    parse_shapes,
    profile_from_shapes,
    qdq_facts,
    shell,
    trtexec_command,
)
from quantkit.errors import QuantkitError
from quantkit.export.qdq import node_names
from quantkit.model import ModelInfo, load_model
from quantkit.options import BuildOptions, given
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet
from quantkit.trt_cache import encode_version, read_trt_cache


class EngineNotBuilt(QuantkitError):
    """TensorRT is not installed here: the trtexec lines (also in the written script) say how to build elsewhere."""

    def __init__(self, message: str, commands: list[str]) -> None:
        super().__init__(message)
        self.commands = commands


@dataclass
class BuildReport:
    output: Path
    ort: OrtBuild | None = None
    engine: BuildResult | None = None
    script: Path | None = None  # the trtexec lines for TensorRT 10.x and 11.x
    tensorrt: str | None = None  # the installed version
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"warning: {w}" for w in self.warnings]
        if self.ort is not None:
            lines.append(f"wrote {self.ort.model} and {self.ort.settings} (providers: {', '.join(self.ort.providers)})")
        if self.engine is not None:
            counts: dict[str, int] = {}
            for p in self.engine.layer_precisions.values():
                counts[p] = counts.get(p, 0) + 1
            lines.append(
                f"built {self.engine.engine} with TensorRT {self.tensorrt}; log {self.engine.log}; layers {self.engine.layers}; "
                f"trtexec equivalent {self.script}"
            )
            lines.append("ONNX nodes by precision: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return "\n".join(lines)


def build(model: str | Path | ModelInfo, output: str | Path, options: BuildOptions | None = None) -> BuildReport:
    """Build ``model`` for ``options.runtime`` into ``output`` (see the module docstring)."""
    options = given(options, BuildOptions, "options")
    model_path = model.path if isinstance(model, ModelInfo) else model
    out = check_output_file(output, model_path, options.cache, options.plan, options.ranges)
    info = model if isinstance(model, ModelInfo) else load_model(model)
    if options.runtime != "tensorrt":
        return BuildReport(out, ort=build_ort(info.path, out, options.runtime))
    plan = PrecisionPlan.load(options.plan) if options.plan else None
    facts = qdq_facts(info.proto)
    typed, typing_warnings = _typed(info, options, plan, facts)
    check_build_request(
        precision=options.precision, calib_cache=options.cache, typed=typed, plan=plan, placeholder_ranges=options.placeholder_ranges
    )
    version = tensorrt_version()
    cache, stamp_note = _cache_for(options, version, out) if options.cache else (None, [])
    shapes, warnings = _profile(options, info)
    warnings = typing_warnings + warnings
    lines = stamp_note + _trtexec_lines(info, out, options, cache, typed, plan, shapes, facts)
    script = out.with_suffix(".trtexec.sh")
    write_bytes_atomic(script, ("#!/bin/sh\n" + "\n".join(lines) + "\n").encode())  # for a GPU machine, built here or not
    if version is None:
        raise EngineNotBuilt(
            f"TensorRT is not installed here, so no engine was built: {INSTALL_HINT}; the equivalent trtexec commands are above "
            f"and in {script}",
            [*[f"# warning: {w}" for w in warnings], *lines],
        )
    engine = build_engine(
        info.path,
        out,
        precision=options.precision,
        calib_cache=cache,
        typed=typed,
        plan=plan,
        shapes=shapes,
        workspace_mib=options.workspace,
        timing_cache=options.timing_cache,
    )
    return BuildReport(out, engine=engine, script=script, tensorrt=version, warnings=warnings)


def _typed(info: ModelInfo, options: BuildOptions, plan: PrecisionPlan | None, facts: QdqFacts) -> tuple[bool, list[str]]:
    """Whether the model's own types decide each layer's precision (Q/DQ or float16: a strongly
    typed build, whatever precision was asked), and the warnings of a weak-typed one."""
    if facts.present:
        check_qdq_for_tensorrt(facts, str(info.path))
        if options.cache:
            raise QuantkitError(
                f"{info.path} already carries Q/DQ scales: a calibration cache would be ignored; build it without the cache",
                option="cache",
            )
    elif options.qdq:
        raise QuantkitError(f"{info.path} has no QuantizeLinear/DequantizeLinear node; quantize it first", option="qdq")
    if plan is not None and plan.quantized_format != "int8" and not facts.present:
        raise QuantkitError(
            f"{options.plan} is an {plan.quantized_format} plan: TensorRT's calibration caches hold INT8 scales only; apply it "
            f"when quantizing (quantkit quantize --format {plan.quantized_format} --plan) and build that",
            option="plan",
        )
    half = has_float16(info.proto)
    if half and options.weak_typing and not facts.present:
        return False, [
            f"{info.path} is a float16 model built weakly typed (--weak-typing): TensorRT 10 reads its types as hints, so the "
            "layers kept in FP32 against float16 overflow may run in FP16; TensorRT 11 builds it strongly typed regardless"
        ]
    return facts.present or half, []


def _profile(options: BuildOptions, info: ModelInfo) -> tuple[list[ShapeProfile], list[str]]:
    """The shapes asked for, else the shapes calibration recorded; a dynamic input with neither is warned about."""
    shapes = parse_shapes(options.shapes)
    if not shapes and options.ranges:
        shapes = profile_from_shapes(info.inputs, RangeSet.load(options.ranges).calibration.get("input_shapes") or {})
    covered = {p.name for p in shapes}
    missing = [i.describe() for i in info.inputs if not all(isinstance(d, int) for d in i.shape) and i.name not in covered]
    if not missing:
        return shapes, []
    return shapes, [
        f"{', '.join(missing)} has dynamic dimensions and no optimization profile: TensorRT builds for a single default shape; "
        "pass --shapes NAME:MIN/OPT/MAX or --ranges ranges.json (the shapes calibration saw)"
    ]


def _trtexec_lines(
    info: ModelInfo,
    out: Path,
    options: BuildOptions,
    cache: str | None,
    typed: bool,
    plan: PrecisionPlan | None,
    shapes: list[ShapeProfile],
    facts: QdqFacts,
) -> list[str]:
    common = {
        "shapes": shapes,
        "workspace_mib": options.workspace,
        "timing_cache": None if options.timing_cache is None else str(options.timing_cache),
        "layer_info": str(out.with_suffix(".layers.json")),
        "precision": options.precision,
        "calib_cache": cache,
        "typed": typed,
        "plan": plan,
    }
    layers = node_names(info) if plan else []
    lines = [f"# {QDQ_BUILD_NOTES[t]}" for t in facts.types if t in QDQ_BUILD_NOTES]
    for major, title in ((10, "TensorRT 10.x"), (11, "TensorRT 11.x (strongly typed; precision comes from the ONNX)")):
        lines.append(f"# {title}")
        try:
            extra = {"layer_names": layers} if major == 10 else {}
            if major >= 11:  # always strongly typed: a float16 model's own types decide, --weak-typing or not
                extra["typed"] = typed or has_float16(info.proto)
            lines.append(shell(trtexec_command(str(info.path), str(out), trt_major=major, **{**common, **extra})))
        except QuantkitError as exc:
            lines.append(f"# not expressible: {exc}")
    return lines


def _cache_for(options: BuildOptions, installed: str | None, out: Path) -> tuple[str, list[str]]:
    """The cache to build with, checked against the installed TensorRT: TensorRT silently skips a
    cache stamped for another version (NVIDIA/TensorRT#1378) and builds without its INT8 scales."""
    given = str(options.cache)
    cache = read_trt_cache(given)
    if cache.algorithm != "EntropyCalibration2":  # also after --restamp, which keeps the algorithm
        raise QuantkitError(
            f"{given} is a {cache.algorithm} cache: trtexec's --calib reads caches into an IInt8EntropyCalibrator2 "
            "(samples/common/sampleEngines.cpp), which ignores another algorithm's cache and would calibrate on no data; "
            "write it as EntropyCalibration2 (quantkit cache --cache-algorithm EntropyCalibration2)",
            option="cache",
        )
    note = [f"# {given} is stamped for TensorRT {cache.version_string} (TRT-{cache.version}-{cache.algorithm}); "
            "TensorRT ignores it on any other version"]  # fmt: skip
    if installed is None:
        return given, note
    wanted = encode_version(".".join(installed.split(".")[:3]))
    if wanted == cache.version:
        return given, note
    if not options.restamp:
        raise QuantkitError(
            f"{given} is stamped for TensorRT {cache.version_string} but TensorRT {installed} is installed: TensorRT would ignore "
            f"it and build without INT8 scales; recalibrate for TensorRT {installed}, or restamp it",
            option="restamp",
        )
    restamped = out.with_suffix(".calib.cache")
    text = Path(given).read_text(encoding="utf-8").split("\n", 1)
    write_bytes_atomic(restamped, (f"TRT-{wanted}-{cache.algorithm}\n" + (text[1] if len(text) > 1 else "")).encode())
    return str(restamped), [f"# {restamped}: {given} restamped from TensorRT {cache.version_string} to {installed} (restamp)"]
