"""The pure half, in milliseconds: which files a window reads, when it is complete, a bad log line
named by file and line, the divergence's bounds and the SLO figures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from llm_assets.manifest import CleanRecipe
from llm_assets.monitoring.drift import ERROR_RATE, LATENCY_P50, js_divergence, slo_figures
from llm_assets.monitoring.traffic import TrafficLogError, complete_until, window_files, window_frames
from llm_assets_tests.monitoring.conftest import request_record, spread, write_log

H = datetime(2026, 11, 30, 10, tzinfo=UTC)


def test_a_window_is_complete_once_no_file_opened_before_its_end_is_open(tmp_path: Path) -> None:
    write_log(tmp_path, "requests", H, [request_record(t, "p") for t in spread(H, 3)])
    late = write_log(tmp_path, "feedback", H + timedelta(minutes=70), [], closed=False)
    now = H + timedelta(hours=3)
    assert complete_until(tmp_path, now) == H + timedelta(minutes=70)
    late.rename(late.with_name(late.name.removesuffix(".open")))
    assert complete_until(tmp_path, now) == now
    assert [f.path.name for f in window_files(tmp_path, H, H + timedelta(hours=1))] == \
        [f"requests-{H.strftime('%Y%m%dT%H%M%S.%fZ')}.jsonl"]


def test_a_bad_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = write_log(tmp_path, "requests", H, [request_record(H, "p")])
    path.write_text(path.read_text() + '{"time": "2026-11-30T10:01:00+00:00", "id": \n')
    with pytest.raises(TrafficLogError, match=rf"{path.name}:2: not a JSON record"):
        window_frames(window_files(tmp_path, H, H + timedelta(hours=1)), H, H + timedelta(hours=1), CleanRecipe())


def test_divergence_bounds_and_slo_figures() -> None:
    p = np.array([3, 1, 0, 0])
    assert js_divergence(p, p * 5) == pytest.approx(0.0)
    assert js_divergence(p, np.array([0, 0, 2, 2])) == pytest.approx(1.0)
    requests = pl.DataFrame({"status": [200, 200, 500, 400], "latency_s": [0.1, 0.2, 0.3, 0.4],
                             "first_token_s": [0.01] * 4})
    figures = slo_figures(requests)
    assert figures[ERROR_RATE] == 0.25 and figures[LATENCY_P50] == pytest.approx(0.25)
