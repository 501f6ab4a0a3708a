"""``python -m benchmarks quality --quick``: the suite runs end to end and its report has the right shape
(no assertion about which method wins: that is what the full run measures)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from benchmarks import quality
from deft_runtime.train.config import PriorPreservation


def test_methods_cover_every_projector_mode_the_issue_names() -> None:
    labels = {m.label for m in quality.METHODS}
    assert labels == {
        "deft-plain",
        "deft-relu",
        "deft-qr",
        "deft-svd",
        "deft-qr-gated",
        "para-qr",
        "para-tsvd",
        "para-nmf",
        "para-eig",
        "lora",
    }
    assert set(quality.TUNED_LR) == set(quality.FAMILIES)


def test_unknown_method_is_refused_with_the_choices() -> None:
    with pytest.raises(SystemExit):
        quality.parse_args(["--methods", "dora"])


def test_prior_weight_sets_the_class_loss_and_zero_trains_without_class_images(tmp_path: Path) -> None:
    def prior(*argv: str) -> object:
        bench = SimpleNamespace(args=quality.parse_args(list(argv)), class_dir=tmp_path)
        return quality.Bench.prior(bench)  # type: ignore[arg-type]

    assert isinstance(default := prior(), PriorPreservation) and default.loss_weight == 1.0
    assert isinstance(half := prior("--prior-weight", "0.5"), PriorPreservation) and half.loss_weight == 0.5
    assert half.class_dir == tmp_path and half.num_images == 50
    assert prior("--prior-weight", "0") is None
    with pytest.raises(SystemExit):
        quality.parse_args(["--prior-weight", "-1"])


def test_quick_run_writes_report_plot_and_grid(tmp_path: Path) -> None:
    tmp_path = tmp_path / "new" / "results"  # a --results-dir that does not exist yet is created
    payload = quality.main(["--quick", "--threads", "1", "--results-dir", str(tmp_path)])
    methods = [row["method"] for row in payload["summary"]]
    assert methods == ["deft-qr", "para-qr", "lora"]
    for row in payload["summary"]:
        assert row["runs"] == 1
        for metric in quality.METRICS:
            assert 0.0 <= row[f"{metric}_mean"] <= 1.0, (row["method"], metric)
            assert row[f"{metric}_std"] == 0.0  # one run: no spread
    for run in payload["runs"]:
        assert (
            run["steps"] == 20
            and run["prior_weight"] == 1.0
            and run["lr"] == quality.TUNED_LR[run["method"].split("-")[0]]
        )
        assert all(0.0 <= run[m] <= 1.0 for m in (*quality.METRICS, "colours"))
    assert 0.0 <= payload["base"]["prior"] <= 1.0
    written = json.loads((tmp_path / "quality-quick.json").read_text())
    assert written["suite"] == "quality" and len(written["runs"]) == 3
    markdown = (tmp_path / "quality-quick.md").read_text()
    assert "| deft-qr |" in markdown and "paper" in markdown
    with Image.open(tmp_path / "quality-quick-grid.png") as grid:  # 3 rows of 4 samples, shown at 2x
        assert grid.size == (2 * (4 * 66 + 2), 2 * (3 * 66 + 2))
    with Image.open(tmp_path / "quality-quick.png") as plot:
        assert plot.width > 300


def test_paired_differences_match_runs_by_concept_and_seed() -> None:
    def run(method: str, concept: str, seed: int, value: float) -> dict[str, object]:
        return {"method": method, "concept": concept, "seed": seed} | dict.fromkeys(
            quality.PAIRED_METRICS, value
        )

    runs = [
        run("deft-qr", "heart", 0, 0.5), run("lora", "heart", 0, 0.25),
        run("deft-qr", "ring", 0, 0.25), run("lora", "ring", 0, 0.5),
        run("deft-qr", "heart", 1, 1.0), run("lora", "heart", 1, 0.5),
        run("deft-qr", "cross", 0, 0.75),  # lora has no such run: left out of the pairing
    ]  # fmt: skip
    d = quality.paired(runs, "deft-qr", "lora", "recognised")
    assert d is not None
    assert (d["n"], d["wins"], d["losses"]) == (3, 2, 1)
    assert d["mean"] == pytest.approx((0.25 - 0.25 + 0.5) / 3)
    assert d["se"] == pytest.approx(statistics.stdev([0.25, -0.25, 0.5]) / 3**0.5)
    assert quality.paired(runs, "deft-qr", "para-qr", "recognised") is None
    rows = quality.paired_rows(runs, ["deft-qr", "para-qr", "lora"])
    assert [r["a − b"] for r in rows] == ["deft-qr − lora", "para-qr − lora", "deft-qr − para-qr"]
    assert rows[0]["recognised"].startswith("+0.167 ± ") and rows[0]["recognised"].endswith("(2/1)")
