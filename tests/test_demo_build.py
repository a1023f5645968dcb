"""`make demo-build`'s driver end to end at its smallest: synth -> build (four kinds, faults) -> validate -> train -> eval."""

from __future__ import annotations

import json

from swim.demos.build_demo import main


def test_demo_build_writes_stats_and_examples(tmp_path, qwen_tokenizer_dir):
    main(["--out", str(tmp_path), "--tokenizer", str(qwen_tokenizer_dir), "--num", "6", "--train-steps", "1"])
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert set(stats) == {"detailed", "qa", "bench_d", "bench_q"}
    assert all(s["records"] == 6 and s["accepted"] + sum(s["rejected"].values()) == 6 for s in stats.values())
    assert (
        stats["detailed"]["rejected"]["reply"] == 1 and stats["qa"]["rejected"]["reply"] == 1
    )  # the demo's faults
    assert stats["detailed"]["accepted_after_retry"] >= 1
    page = (tmp_path / "examples.md").read_text()
    assert "before: " in page and "after:  " in page and "rejected at stage `reply`" in page
    assert json.loads((tmp_path / "eval_bench_q" / "results.json").read_text())["n_questions"] == 6
