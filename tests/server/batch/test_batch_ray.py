"""The batch command on Ray Data: a local Ray cluster started here (2 CPUs), 2 actors of one core each, each with its
own reference engine; the merged output equals the single-process run item for item, and a rerun resumes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.batch import batch_settings, by_key, image_folder, run_in_process
from tests.support.live_server import LiveServer

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_actors_equal_the_single_process_run(local_cluster: None, server: LiveServer, tmp_path: Path) -> None:
    from server.batch.ray_job import run_ray, shards

    folder = image_folder(tmp_path / "pics", 8, seed0=500)
    job = dict(input=folder, levels="0,1", max_tokens=6, torch_threads=1)
    single = tmp_path / "single.jsonl"
    run_in_process(batch_settings(server.settings, output=single, **job), engine=server.engine)
    merged = tmp_path / "ray.jsonl"
    settings = batch_settings(
        server.settings, output=merged, ray=True, workers=2, cpus_per_worker=1, ray_batch_size=2, **job
    )
    summary = run_ray(settings)
    assert summary["this_run"]["results"] == 18 and summary["failures"] == 2
    want, got = by_key(single), by_key(merged)
    assert got.keys() == want.keys()
    for k, rec in want.items():
        assert got[k].get("caption") == rec.get("caption"), k
        assert got[k].get("telemetry") == rec.get("telemetry"), k
        assert got[k]["error"] == rec["error"], k
    # Both actors started (each opens its own shard), and the shards hold the merged file's lines. Which actor takes
    # which batch is Ray's choice: on a quiet machine one actor took all of them (a fresh-clone CI run), so an
    # empty shard is allowed.
    parts = [by_key(p) for p in shards(merged)]
    assert len(parts) == 2 and any(parts)
    assert sum(len(p) for p in parts) == len(got)
    # A rerun finds everything done: nothing is sent to the actors, the output keeps one line per result.
    again = run_ray(settings)
    assert again["this_run"]["results"] == 0 and again["this_run"]["skipped"] == 18
    assert len(merged.read_text().splitlines()) == 18
    # A merge cut short (the output lost its last lines) is finished from the shards by the next run.
    lines = merged.read_text().splitlines(keepends=True)
    merged.write_text("".join(lines[:10]))
    run_ray(settings)
    assert by_key(merged).keys() == want.keys()
    assert json.loads(lines[0])["id"] in {k[0] for k in want}
