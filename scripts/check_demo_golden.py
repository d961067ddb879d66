"""Compare a `quantkit demo` output folder with the golden SHA-256 list (tests/demo/golden/SHA256SUMS).

Usage: python scripts/check_demo_golden.py reports/demo. Exit 1 when a file differs. ranges.json
records the absolute paths of the model and the data; they are compared as the golden run's
(/work/main), so a clone in another folder matches too. Its numbers come from onnxruntime's float
arithmetic, which may differ in the last bits between CPUs: a ranges.json mismatch on another CPU
is not a regression by itself; the other files must match whenever ranges.json does.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "demo" / "golden" / "SHA256SUMS"


def _as_golden(path: Path) -> bytes:
    """The file's bytes; for ranges.json, with the recorded paths as the golden run recorded them."""
    if path.name != "ranges.json":
        return path.read_bytes()
    golden = json.loads((GOLDEN.parent / "ranges.json").read_text())
    text = path.read_text()
    doc = json.loads(text)
    for old, new in ((doc["model"]["path"], golden["model"]["path"]), (doc["calibration"]["data"], golden["calibration"]["data"])):
        text = text.replace(json.dumps(old), json.dumps(new))
    return text.encode()


def main(folder: str) -> int:
    differ = 0
    for line in GOLDEN.read_text().splitlines():
        digest, name = line.split()
        path = Path(folder) / name
        got = hashlib.sha256(_as_golden(path)).hexdigest() if path.exists() else "missing"
        same = got == digest
        differ += not same
        print(f"{'same' if same else 'DIFFERS'}  {name}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "reports/demo"))
