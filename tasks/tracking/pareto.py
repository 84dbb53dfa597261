"""The Pareto plot and table of one pipeline run, logged on its parent run (the drawing is lsq's)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from lsq.plotting import PLOT_LOCK
from lsq.variants import pareto_front
from tasks.tracking.store import client_for


def log_pareto(uri: str, parent_run_id: str, rows: Sequence[Mapping[str, Any]], metric_name: str,
               greater_is_better: bool = True, champion_label: str | None = None) -> list[str]:
    """Log :func:`lsq.report.pareto_figure` of ``rows`` and their table on ``parent_run_id``; the front's labels.

    Artifacts: ``pareto/pareto.png``, ``pareto/variants.json`` (metric, direction, front, champion,
    rows), ``pareto/variants.csv``. Rows need ``label``, ``adapter_bytes`` and ``metric`` (None: not
    scored); ``method`` and ``rank``, when the rows have them, become columns too.
    """
    from lsq.report import pareto_figure

    scored = [r for r in rows if r.get("metric") is not None]
    front = pareto_front([(r["label"], int(r["adapter_bytes"]), float(r["metric"])) for r in scored], greater_is_better)
    extra = [k for k in ("method", "rank") if any(k in r for r in rows)]
    table = [{"label": r["label"], **{k: r.get(k) for k in extra}, "adapter_bytes": int(r["adapter_bytes"]),
              metric_name: None if r.get("metric") is None else float(r["metric"]), "on_front": r["label"] in front}
             for r in rows]
    client = client_for(uri)
    fig = pareto_figure(rows, metric_name, greater_is_better, champion_label)
    with PLOT_LOCK:  # saving lays out text too (shared with lsq.report and lsq.plotting)
        client.log_figure(parent_run_id, fig, "pareto/pareto.png")
    client.log_dict(parent_run_id, {"metric": metric_name, "greater_is_better": greater_is_better, "front": front,
                                    "champion": champion_label, "variants": table}, "pareto/variants.json")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]) if table else ["label"])
    writer.writeheader()
    writer.writerows(table)
    client.log_text(parent_run_id, buf.getvalue(), "pareto/variants.csv")
    return front
