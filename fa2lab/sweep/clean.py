"""Strip a notebook for committing: `python -m fa2lab.sweep.clean notebooks/*.ipynb`.

Removes every output and execution count, and saved widget state, except in cells tagged
`nbval-check-output`: those keep their printed lines (and an execution count, which nbval needs
to compare them), since they are the expected values that `pytest --nbval-lax` checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHECK_TAG = "nbval-check-output"


def is_check_cell(cell: dict) -> bool:
    return CHECK_TAG in cell.get("metadata", {}).get("tags", [])


def strip_notebook(nb: dict) -> dict:
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        cell.get("metadata", {}).pop("execution", None)
        if is_check_cell(cell):
            cell["outputs"] = [o for o in cell.get("outputs", []) if o.get("output_type") == "stream"]
            cell["execution_count"] = 1 if cell["outputs"] else None
        else:
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
