"""Re-record the outputs nbval checks: `make nbval-record` (run after an intended change of a summary number).

Executes each notebook with its own (smoke) parameters, in order, and stores the outputs of the NBVAL_CHECK_OUTPUT
cells — and only those — in the committed notebooks.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import nbformat
import papermill

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_lib.core.config import NOTEBOOKS  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in NOTEBOOKS.values():
            src = ROOT / "notebooks" / name
            out = Path(tmp) / name
            papermill.execute_notebook(
                str(src),
                str(out),
                cwd=str(ROOT / "notebooks"),
                progress_bar=False,
                kernel_name="python3",
                parameters={"outputs_dir": str(Path(tmp) / "outputs")},
            )
            executed = nbformat.read(out, as_version=4)
            nb = nbformat.read(src, as_version=4)
            for cell, done in zip(
                nb.cells, [c for c in executed.cells if "injected-parameters" not in c.metadata.get("tags", [])]
            ):
                if cell.cell_type != "code":
                    continue
                cell.execution_count = None
                cell.outputs = []
                if "NBVAL_CHECK_OUTPUT" in cell.source:
                    assert done.source == cell.source
                    cell.outputs = [
                        o for o in done.outputs if o.output_type in ("execute_result", "display_data", "stream")
                    ]
                    cell.execution_count = 1  # nbval treats a cell with outputs but no count as never run
                    for o in cell.outputs:
                        if "execution_count" in o:
                            o.execution_count = 1
            nbformat.write(nb, src)
            print("recorded", src.relative_to(ROOT))


if __name__ == "__main__":
    main()
