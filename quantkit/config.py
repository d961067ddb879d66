"""Reading the small user-written files (preprocessing configs, precision plans): JSON or YAML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError


def read_mapping_file(path: str | Path, what: str) -> dict[str, Any]:
    """Parse ``path`` as YAML (.yaml/.yml) or JSON; anything but a mapping is a clear error naming ``what``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise QuantkitError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text) or {}
        else:
            doc = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one clear line
        raise QuantkitError(f"cannot parse {what} {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise QuantkitError(f"{what} {path} must hold a mapping of options")
    return doc
