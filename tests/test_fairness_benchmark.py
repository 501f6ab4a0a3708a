"""``python -m benchmarks fairness --quick``: the suite runs end to end and reports every run (a smoke
test: no timing is asserted; the figures are the full run's, in benchmarks/results)."""

from __future__ import annotations

import json

import pytest

from benchmarks import fairness

pytestmark = pytest.mark.slow


def test_quick_fairness_run_reports_every_run_and_ratio(tmp_path):
    payload = fairness.main(["--quick", "--out-dir", str(tmp_path)])
    runs = [row["run"] for row in payload["rows"]]
    assert runs == [
        "B alone",
        "B under flood, fair",
        "B under flood, fcfs",
        "B under flood, fair admission only",
    ]
    assert all(row["n"] == 4 for row in payload["rows"])  # every one of B's requests finished in each run
    assert all(row["throughput_img_s"] > 0 for row in payload["rows"][1:])
    assert set(payload["ratios"]) == {
        "B p99 flood (fair) / alone",
        "B p99 flood (fcfs) / alone",
        "B p99 flood (fair admission only) / alone",
        "throughput fair / fcfs",
        "throughput fair admission only / fcfs",
    }
    written = json.loads((tmp_path / "fairness-tiny-sdxl-quick.json").read_text())
    assert written["ratios"] == payload["ratios"] and written["params"]["mixed_rows"] == 4
    assert (tmp_path / "fairness-tiny-sdxl-quick.md").read_text().startswith("# fairness")
    assert (tmp_path / payload["plot"]).stat().st_size > 0
