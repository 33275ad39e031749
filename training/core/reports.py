"""Report files every stage writes the same way: CSV text and matplotlib figures as PNG bytes
(the caller writes both atomically with checkpoint.atomic_write_*)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any] | Mapping[str, Any]]) -> str:
    """A header line, then one line per row: a sequence in header order, or a mapping whose
    keys outside the header are left out."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in rows:
        writer.writerow([row.get(k, "") for k in header] if isinstance(row, Mapping) else row)
    return buf.getvalue()


def pyplot():  # noqa: ANN201 (matplotlib.pyplot, imported on first use: it takes a second)
    """matplotlib.pyplot on the Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    return buf.getvalue()
