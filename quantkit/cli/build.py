"""``quantkit build``: a TensorRT engine (10.x/11.x), or an optimized onnxruntime model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quantkit._io import check_output_file, write_bytes_atomic
from quantkit.backends.ort import ORT_RUNTIMES, build_ort
from quantkit.backends.trt import INSTALL_HINT, build_engine, tensorrt_version
from quantkit.backends.trtexec import (
    PRECISIONS,
    QDQ_BUILD_NOTES,
    QdqFacts,
    ShapeProfile,
    check_build_request,
    check_qdq_for_tensorrt,
    parse_shapes,
    profile_from_shapes,
    qdq_facts,
    shell,
    trtexec_command,
)
from quantkit.errors import QuantkitError
from quantkit.export.qdq import node_names
from quantkit.model import ModelInfo, load_model
from quantkit.plan import PrecisionPlan
from quantkit.ranges import RangeSet
from quantkit.trt_cache import encode_version, read_trt_cache


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model (FP32, or Q/DQ / FP16 from quantkit quantize / fp16)")
    p.add_argument("--runtime", choices=["tensorrt", *ORT_RUNTIMES], default="tensorrt")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16", help="TensorRT 10 builder precision (ignored for Q/DQ models)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--cache", help="TensorRT calibration cache for implicit INT8 (TensorRT 10)")
    src.add_argument("--qdq", action="store_true", help="the model carries Q/DQ: build strongly typed (detected from the model too)")
    p.add_argument("--plan", help="precision plan for per-layer constraints (TensorRT 10)")
    p.add_argument(
        "--restamp",
        action="store_true",
        help="the cache is stamped for another TensorRT version: write a copy stamped for the installed one and build with it",
    )
    p.add_argument(
        "--placeholder-ranges",
        action="store_true",
        help="allow --precision int8 without ranges: placeholder scales, for a performance-only engine (accuracy meaningless)",
    )
    p.add_argument("--shapes", help="dynamic shapes: NAME:MIN/OPT/MAX, dims joined by x")
    p.add_argument(
        "--ranges",
        help="ranges.json from calibrate: its recorded input shapes give the dynamic inputs' optimization profile (unless --shapes)",
    )
    p.add_argument("--workspace", type=int, help="workspace memory pool in MiB")
    p.add_argument("--timing-cache", help="timing cache file, read and updated")
    p.add_argument("-o", "--output", required=True, help="engine file (TensorRT) or optimized .onnx (onnxruntime)")


def _profile(args: argparse.Namespace, model: ModelInfo) -> list[ShapeProfile]:
    """--shapes, else the shapes calibration recorded; a dynamic input with neither is warned about."""
    shapes = parse_shapes(args.shapes)
    if not shapes and args.ranges:
        shapes = profile_from_shapes(model.inputs, RangeSet.load(args.ranges).calibration.get("input_shapes") or {})
    covered = {p.name for p in shapes}
    missing = [i.describe() for i in model.inputs if not all(isinstance(d, int) for d in i.shape) and i.name not in covered]
    if missing:
        print(
            f"quantkit build: warning: {', '.join(missing)} has dynamic dimensions and no optimization profile: TensorRT builds for "
            "a single default shape; pass --shapes NAME:MIN/OPT/MAX or --ranges ranges.json (the shapes calibration saw)",
            file=sys.stderr,
        )
    return shapes


def _trtexec_lines(
    args: argparse.Namespace, plan: PrecisionPlan | None, layers: list[str], shapes: list[ShapeProfile], facts: QdqFacts
) -> list[str]:
    out = Path(args.output)
    common = {
        "shapes": shapes,
        "workspace_mib": args.workspace,
        "timing_cache": args.timing_cache,
        "layer_info": str(out.with_suffix(".layers.json")),
    }
    lines = [f"# {QDQ_BUILD_NOTES[t]}" for t in facts.types if t in QDQ_BUILD_NOTES]
    lines.append("# TensorRT 10.x")
    try:
        cmd10 = trtexec_command(
            args.model,
            str(out),
            trt_major=10,
            precision=args.precision,
            calib_cache=args.cache,
            qdq=args.qdq,
            plan=plan,
            layer_names=layers,
            **common,
        )
        lines.append(shell(cmd10))
    except QuantkitError as exc:
        lines.append(f"# not expressible: {exc}")
    lines.append("# TensorRT 11.x (strongly typed; precision comes from the ONNX)")
    try:
        cmd11 = trtexec_command(
            args.model, str(out), trt_major=11, precision=args.precision, calib_cache=args.cache, qdq=args.qdq, plan=plan, **common
        )
        lines.append(shell(cmd11))
    except QuantkitError as exc:
        lines.append(f"# not expressible: {exc}")
    return lines


def _cache_for(args: argparse.Namespace, installed: str | None, out: Path) -> tuple[str, list[str]]:
    """The cache to build with, checked against the installed TensorRT: TensorRT silently skips a
    cache stamped for another version (NVIDIA/TensorRT#1378) and builds without its INT8 scales."""
    cache = read_trt_cache(args.cache)
    note = [f"# {args.cache} is stamped for TensorRT {cache.version_string} (TRT-{cache.version}-{cache.algorithm}); "
            "TensorRT ignores it on any other version"]  # fmt: skip
    if installed is None:
        return args.cache, note
    wanted = encode_version(".".join(installed.split(".")[:3]))
    if wanted == cache.version:
        return args.cache, note
    if not args.restamp:
        raise QuantkitError(
            f"{args.cache} is stamped for TensorRT {cache.version_string} but TensorRT {installed} is installed: TensorRT would ignore "
            f"it and build without INT8 scales; recalibrate with --trt-version {installed}, or pass --restamp",
            option="cache",
        )
    restamped = out.with_suffix(".calib.cache")
    text = Path(args.cache).read_text(encoding="utf-8").split("\n", 1)
    write_bytes_atomic(restamped, (f"TRT-{wanted}-{cache.algorithm}\n" + (text[1] if len(text) > 1 else "")).encode())
    return str(restamped), [f"# {restamped}: {args.cache} restamped from TensorRT {cache.version_string} to {installed} (--restamp)"]


def run(args: argparse.Namespace) -> int:
    check_output_file(args.output, args.model, args.cache, args.plan, args.ranges)
    model = load_model(args.model)
    out = Path(args.output)
    if args.runtime != "tensorrt":
        built = build_ort(model.path, out, args.runtime)
        if not args.quiet:
            print(f"wrote {built.model} and {built.settings} (providers: {', '.join(built.providers)})")
        return 0
    plan = PrecisionPlan.load(args.plan) if args.plan else None
    facts = qdq_facts(model.proto)
    if facts.present:  # the Q/DQ types decide the precision: a strongly typed build, whatever was asked
        check_qdq_for_tensorrt(facts, args.model)
        if args.cache:
            raise QuantkitError(
                f"{args.model} already carries Q/DQ scales: a calibration cache would be ignored; build it without --cache",
                option="cache",
            )
        args.qdq = True
    elif args.qdq:
        raise QuantkitError(f"--qdq: {args.model} has no QuantizeLinear/DequantizeLinear node; quantize it first", option="qdq")
    if plan is not None and plan.quantized_format != "int8" and not facts.present:
        raise QuantkitError(
            f"{args.plan} is an {plan.quantized_format} plan: TensorRT's calibration caches hold INT8 scales only; apply it "
            f"when quantizing (quantkit quantize --format {plan.quantized_format} --plan) and build that model",
            option="plan",
        )
    check_build_request(
        precision=args.precision, calib_cache=args.cache, qdq=args.qdq, plan=plan, placeholder_ranges=args.placeholder_ranges
    )
    version = tensorrt_version()
    stamp_note = []
    if args.cache:
        args.cache, stamp_note = _cache_for(args, version, out)
    layers = node_names(model) if plan else []
    shapes = _profile(args, model)
    lines = stamp_note + _trtexec_lines(args, plan, layers, shapes, facts)
    script = out.with_suffix(".trtexec.sh")
    write_bytes_atomic(script, ("#!/bin/sh\n" + "\n".join(lines) + "\n").encode())  # for a GPU machine, built here or not
    if version is None:
        print("\n".join(lines))
        raise QuantkitError(
            f"TensorRT is not installed here, so no engine was built: {INSTALL_HINT}; "
            f"the equivalent trtexec commands are above and in {script}"
        )
    result = build_engine(
        model.path,
        out,
        precision=args.precision,
        calib_cache=args.cache,
        qdq=args.qdq,
        plan=plan,
        shapes=shapes,
        workspace_mib=args.workspace,
        timing_cache=args.timing_cache,
    )
    if not args.quiet:
        counts: dict[str, int] = {}
        for p in result.layer_precisions.values():
            counts[p] = counts.get(p, 0) + 1
        print(f"built {result.engine} with TensorRT {version}; log {result.log}; layers {result.layers}; trtexec equivalent {script}")
        print("ONNX nodes by precision: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0
