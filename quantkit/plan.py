"""``PrecisionPlan``: which ONNX nodes run in int8, fp16 or fp32 (a plain data object + JSON/YAML file).

Format (JSON or YAML)::

    {
      "format": "quantkit.plan",
      "default": "int8",                       # every node not matched below
      "fallback": "fp32",                      # int8 nodes whose op has no int8 placement
      "quantized_format": "int8",              # what "int8" entries are quantized to: int8, or fp8 (E4M3)
      "nodes": {
        "/features/features.0/features.0.0/Conv": "fp32",   # an exact node name
        "/head/*": "fp16",                                  # a glob (fnmatch)
        "re:.*/attn/.*MatMul": "fp16"                       # a regular expression (full match)
      }
    }

Exact names win over patterns; among patterns, the first that matches (in file order) wins.
Names and patterns that match no node of the model are an error that lists close matches, so a
typo never silently leaves a layer at the wrong precision.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit._io import read_mapping_file, write_bytes_atomic
from quantkit.errors import QuantkitError

PRECISIONS = ("int8", "fp16", "fp32")
FORMAT = "quantkit.plan"
#: what a plan's quantized ("int8") entries become: the Q/DQ format it was tuned and checked for
QUANTIZED_FORMATS = ("int8", "fp8")


def _check_precision(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.lower() not in PRECISIONS:
        raise QuantkitError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value.lower()


def _is_pattern(key: str) -> bool:
    return key.startswith("re:") or any(c in key for c in "*?[")


def _matches(key: str, name: str) -> bool:
    if key.startswith("re:"):
        return re.fullmatch(key[3:], name) is not None
    return fnmatch.fnmatchcase(name, key)


@dataclass(frozen=True)
class NodeFilter:
    """Which nodes may be quantized, by op type and by ONNX node name (regular expressions, matched
    anywhere in the name); a precision plan's own entries win over it."""

    op_types: tuple[str, ...] = ()  # only these op types (empty: every op the placement quantizes)
    exclude_op_types: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()  # only nodes whose name matches one of these
    exclude_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field_name in ("op_types", "exclude_op_types", "nodes", "exclude_nodes"):
            value = getattr(self, field_name)
            object.__setattr__(self, field_name, tuple([value] if isinstance(value, str) else value))
        for field_name in ("nodes", "exclude_nodes"):
            for pattern in getattr(self, field_name):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise QuantkitError(f"node pattern {pattern!r} is not a valid regular expression: {exc}", option=field_name) from None

    @property
    def empty(self) -> bool:
        return not (self.op_types or self.exclude_op_types or self.nodes or self.exclude_nodes)

    def refusal(self, name: str, op_type: str) -> str:
        """Why the filter keeps this node in float ("" when it may be quantized)."""
        if self.op_types and op_type not in self.op_types:
            return f"filter: op type {op_type} not in --op-types"
        if op_type in self.exclude_op_types:
            return f"filter: op type {op_type} excluded"
        if self.nodes and not any(re.search(p, name) for p in self.nodes):
            return "filter: name matches no --nodes pattern"
        hit = next((p for p in self.exclude_nodes if re.search(p, name)), None)
        return f"filter: name matches --exclude-nodes {hit!r}" if hit else ""


@dataclass
class PrecisionPlan:
    """Node name (or pattern) -> precision, with a default for every other node."""

    default: str = "int8"
    fallback: str = "fp32"
    nodes: dict[str, str] = field(default_factory=dict)
    quantized_format: str = "int8"

    def __post_init__(self) -> None:
        if self.quantized_format not in QUANTIZED_FORMATS:
            raise QuantkitError(f"plan quantized_format must be one of {', '.join(QUANTIZED_FORMATS)}, got {self.quantized_format!r}")
        self.default = _check_precision(self.default, "plan default")
        self.fallback = _check_precision(self.fallback, "plan fallback")
        if self.fallback == "int8":
            raise QuantkitError("plan fallback must be fp16 or fp32 (it is where int8 nodes go when they cannot be int8)")
        self.nodes = {k: _check_precision(v, f"plan entry {k!r}") for k, v in self.nodes.items()}
        for key in self.nodes:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise QuantkitError(f"plan entry {key!r} is not a valid regular expression: {exc}") from None

    # ---- resolution ------------------------------------------------------------------------
    def names(self, node_name: str) -> bool:
        """Whether an entry of the plan (a name or a pattern) speaks for this node."""
        return any(key == node_name if not _is_pattern(key) else _matches(key, node_name) for key in self.nodes)

    def precision_of(self, node_name: str) -> str:
        if node_name in self.nodes and not _is_pattern(node_name):
            return self.nodes[node_name]
        for key, precision in self.nodes.items():
            if _is_pattern(key) and _matches(key, node_name):
                return precision
        return self.default

    def resolve(self, node_names: list[str], source: str = "the plan") -> dict[str, str]:
        """Precision of every node; entries that match no node are an error naming close matches."""
        names = set(node_names)
        unmatched = []
        for key in self.nodes:
            if _is_pattern(key):
                if not any(_matches(key, n) for n in node_names):
                    unmatched.append(f"pattern {key!r} matches no node")
            elif key not in names:
                close = difflib.get_close_matches(key, node_names, n=3, cutoff=0.6)
                hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
                unmatched.append(f"node {key!r} does not exist{hint}")
        if unmatched:
            raise QuantkitError(f"{source}: " + "; ".join(unmatched))
        return {n: self.precision_of(n) for n in node_names}

    # ---- files ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": 1,
            "default": self.default,
            "fallback": self.fallback,
            "quantized_format": self.quantized_format,
            "nodes": dict(self.nodes),
        }

    def save(self, path: str | Path) -> Path:
        return write_bytes_atomic(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @classmethod
    def from_mapping(cls, doc: Any, source: str = "plan") -> PrecisionPlan:
        if not isinstance(doc, dict):
            raise QuantkitError(f"{source} must hold a mapping with 'default' and 'nodes'")
        if doc.get("format", FORMAT) != FORMAT:
            raise QuantkitError(f"{source} is not a quantkit precision plan (format {doc.get('format')!r})")
        unknown = set(doc) - {"format", "version", "default", "fallback", "quantized_format", "nodes"}
        if unknown:
            raise QuantkitError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
        version = doc.get("version", 1)
        if isinstance(version, bool) or version != 1:
            raise QuantkitError(f"{source}: version must be 1 (the only plan version), got {version!r}")
        nodes = doc.get("nodes") or {}
        if not isinstance(nodes, dict):
            raise QuantkitError(f"{source}: 'nodes' must map node names or patterns to precisions")
        bad = [k for k in nodes if not isinstance(k, str)]
        if bad:
            raise QuantkitError(f'{source}: node names must be strings, got {bad[0]!r}; quote it ("{bad[0]}")')
        for key in ("default", "fallback"):
            if key in doc and not isinstance(doc[key], str):
                raise QuantkitError(f"{source}: {key} must be int8, fp16 or fp32, got {doc[key]!r}")
        quantized = doc.get("quantized_format", "int8")
        if not isinstance(quantized, str) or quantized not in QUANTIZED_FORMATS:
            raise QuantkitError(f"{source}: quantized_format must be one of {', '.join(QUANTIZED_FORMATS)}, got {quantized!r}")
        return cls(default=doc.get("default", "int8"), fallback=doc.get("fallback", "fp32"), nodes=dict(nodes), quantized_format=quantized)

    @classmethod
    def load(cls, path: str | Path) -> PrecisionPlan:
        return cls.from_mapping(read_mapping_file(path, "precision plan"), str(path))
