"""Training-curve TSVs: exist from the start, one row per logged epoch, readable as a DVC plot."""

from __future__ import annotations

import csv

from pipeline.curves import CurveLog


def test_curve_log_writes_a_header_then_rows(tmp_path):
    log = CurveLog(tmp_path / "curves.tsv")
    assert (tmp_path / "curves.tsv").read_text() == "step\n"  # an output DVC can find even if nothing is logged
    log(10, {"loss": 2.5, "lr": 1e-4})
    log(20, {"loss": 1.25, "lr": 5e-5})
    rows = list(csv.DictReader((tmp_path / "curves.tsv").open(), delimiter="\t"))
    assert rows == [{"step": "10", "loss": "2.5", "lr": "0.0001"}, {"step": "20", "loss": "1.25", "lr": "5e-05"}]
