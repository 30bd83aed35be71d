"""``sbsearch rank``: a few steps of each sampled configuration's replicas, ranked by the score."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from sbsearch.cli import main
from sbsearch.rank import format_ranking, rank_configs, sample_configs, write_ranking
from sbsearch.spec import parse_spec
from tests.conftest import tiny_spec_dict


def test_sample_configs_are_distinct_seeded_and_capped_by_the_space() -> None:
    spec = parse_spec(tiny_spec_dict())  # 2 x 2 x 2 = 8 configurations
    first = sample_configs(spec, 5, seed=1)
    assert len({c.label() for c in first}) == 5
    assert [c.label() for c in sample_configs(spec, 5, seed=1)] == [c.label() for c in first]
    assert len(sample_configs(spec, 20, seed=1)) == 8


def test_rank_trains_scores_and_logs_the_table(tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec_dict(train__replicas=1))
    ranking = rank_configs(spec, configs=3, steps=2, subset=0.2)
    assert ranking.replicas == 2 and len(ranking.rows) == 3
    scores = [r.score for r in ranking.rows]
    assert all(math.isfinite(s) and s > 0 for s in scores) and scores == sorted(scores, reverse=True)
    table = format_ranking(ranking)
    assert table.splitlines()[0] == "| rank | configuration | sb_score | val_accuracy | seconds |"
    path, run_id = write_ranking(ranking, spec, tmp_path / "out")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["sb_score"]) for r in rows] == pytest.approx(scores)
    assert {"expansion.factor", "norm.kind", "val_accuracy"} <= set(rows[0])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.tags["sbsearch.role"] == "rank" and run.data.params["steps"] == "2"
    assert {a.path for a in client.list_artifacts(run_id)} == {"ranking.md", "ranking.csv"}


def test_rank_command_prints_the_table_and_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_dict(search__score_direction="low_is_good")), encoding="utf-8")
    assert main(["rank", str(spec), "--configs", "2", "--steps", "1", "--subset", "0.1", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "low sb_score first" in out and (tmp_path / "r" / "ranking.csv").exists()
    assert main(["rank", str(spec), "--configs", "0", "--subset", "1.5"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --configs: must be >= 1, but got 0", "error: --subset: must be in (0, 1], but got 1.5"]
