"""Strip a notebook for committing: `python -m fa2lab.sweep.clean notebooks/*.ipynb`.

Removes every output, execution count and saved widget state: notebooks are committed without
outputs. The cells tagged `checks` hold the notebook's own assertions (the online softmax equals
the exact one, the fitted exponent is below 1.1, ...); nbval runs them, and a failed assert fails
the test. The tag of an older layout, `nbval-check-output`, is renamed on the way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHECK_TAG = "checks"
OLD_CHECK_TAG = "nbval-check-output"  # compared stored outputs: incompatible with output-free commits


def is_check_cell(cell: dict) -> bool:
    return CHECK_TAG in cell.get("metadata", {}).get("tags", [])


def strip_notebook(nb: dict) -> dict:
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        meta = cell.setdefault("metadata", {})
        meta.pop("execution", None)
        if OLD_CHECK_TAG in meta.get("tags", []):
            meta["tags"] = [CHECK_TAG if t == OLD_CHECK_TAG else t for t in meta["tags"]]
        cell["outputs"], cell["execution_count"] = [], None
    return nb


def main(argv=None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__)
        return 2
    for path in paths:
        nb = json.loads(path.read_text(encoding="utf-8"))
        text = json.dumps(strip_notebook(nb), sort_keys=True, indent=1, ensure_ascii=False) + "\n"
        path.write_text(text, encoding="utf-8")
        print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
