"""run_scripts/eval_lmms.sh with a stand-in lmms-eval (no .venv-lmms needed), and the shipped lmms-eval tasks'
document functions (lmms_tasks/swim_bench_q/utils.py) on synthetic and hand-made Bench-Q records.

The stand-in is a fake ``lmms_eval`` package (and a fake ``accelerate.commands.launch``) on PYTHONPATH of this
interpreter: it records its command line and writes a results file the way lmms-eval names them, or not.
The real thing runs in `make test-lmms` (tools/test_lmms.sh).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from swim.data.synth.shapes import SynthConfig, generate
from swim.data.video import probe_video
from swim.eval.bench_q import build_items, load_bench

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_scripts" / "eval_lmms.sh"
TASK_DIR = ROOT / "lmms_tasks" / "swim_bench_q"
# what the script reads from the environment: cleared so that the caller's settings do not leak in
SCRIPT_ENV = ("DEVICE", "ATTN", "LIMIT", "INCLUDE_PATH", "EXTRA_MODEL_ARGS", "LMMS_EVAL_ARGS", "MAX_NUM_FRAMES",
              "MIN_PIXELS", "MAX_PIXELS", "PORT", "LMMS_PYTHON", "PYTHONPATH", "FORCE_QWENVL_VIDEO_READER")  # fmt: skip

FAKE_MAIN = '''
"""Stand-in for `python -m lmms_eval`: FAKE_LMMS_MODE = ok | nothing | missing | fail."""
import argparse, json, os, sys
from pathlib import Path

p = argparse.ArgumentParser()
for a in ("--model", "--model_args", "--tasks", "--output_path", "--include_path", "--limit", "--batch_size",
          "--log_samples_suffix", "--gen_kwargs"):
    p.add_argument(a)
p.add_argument("--log_samples", action="store_true")
args, rest = p.parse_known_args()
Path(os.environ["FAKE_LMMS_RECORD"]).write_text(json.dumps(
    {"argv": sys.argv[1:], "reader": os.environ.get("FORCE_QWENVL_VIDEO_READER"), "rest": rest}))
mode = os.environ.get("FAKE_LMMS_MODE", "ok")
if mode == "fail":
    sys.exit(3)
tasks = args.tasks.split(",")
if mode == "missing":
    tasks = tasks[:-1]
if mode != "nothing":
    out = Path(args.output_path) / "fake__model"
    out.mkdir(parents=True, exist_ok=True)
    results = {t: {"alias": t, "accuracy,none": 50.0, "accuracy_stderr,none": "N/A"} for t in tasks}
    configs = {t: {"task": t, "tag": os.environ.get("FAKE_LMMS_TAG")} for t in tasks}
    (out / "20260101_000000_results.json").write_text(json.dumps({"results": results, "configs": configs}))
print("fake lmms-eval done")  # like lmms-eval, exit 0 whatever happened inside
'''

FAKE_LAUNCH = '''
"""Stand-in for `python -m accelerate.commands.launch ... -m lmms_eval ...`: records, then runs the module."""
import json, os, runpy, sys
from pathlib import Path

argv = sys.argv[1:]
Path(os.environ["FAKE_LAUNCH_RECORD"]).write_text(json.dumps(argv))
i = argv.index("-m")
sys.argv = [argv[i + 1], *argv[i + 2:]]
runpy.run_module(argv[i + 1], run_name="__main__")
'''


@pytest.fixture
def fake(tmp_path):
    """Fake lmms_eval + accelerate packages; `run(*args, **env)` runs the script against them."""
    pkgs = tmp_path / "fake"
    (pkgs / "lmms_eval").mkdir(parents=True)
    (pkgs / "lmms_eval" / "__init__.py").write_text("")
    (pkgs / "lmms_eval" / "__main__.py").write_text(textwrap.dedent(FAKE_MAIN))
    (pkgs / "accelerate" / "commands").mkdir(parents=True)
    (pkgs / "accelerate" / "__init__.py").write_text("")
    (pkgs / "accelerate" / "commands" / "__init__.py").write_text("")
    (pkgs / "accelerate" / "commands" / "launch.py").write_text(textwrap.dedent(FAKE_LAUNCH))
    flash = tmp_path / "with_flash_attn"
    (flash / "flash_attn").mkdir(parents=True)
    (flash / "flash_attn" / "__init__.py").write_text("")
    record, launch_record = tmp_path / "lmms_argv.json", tmp_path / "launch_argv.json"

    class Fake:
        out = tmp_path / "out"
        flash_attn = flash

        def run(self, *args, pythonpath=(), **env):
            full = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
            full.update(LMMS_PYTHON=sys.executable, FAKE_LMMS_RECORD=str(record),
                        FAKE_LAUNCH_RECORD=str(launch_record),
                        PYTHONPATH=os.pathsep.join(str(p) for p in (pkgs, *pythonpath)), **env)  # fmt: skip
            args = args or ("ckpt/x", str(self.out), "", "task_a,task_b")
            return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True,
                                  timeout=120, cwd=tmp_path)  # fmt: skip

        @property
        def lmms(self) -> dict:
            return json.loads(record.read_text())

        @property
        def launch(self) -> list[str] | None:
            return json.loads(launch_record.read_text()) if launch_record.exists() else None

    return Fake()


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_cpu_run_passes_device_limit_include_path_and_extra_model_args(fake):
    proc = fake.run(
        DEVICE="cpu", LIMIT="3", INCLUDE_PATH=str(TASK_DIR.parent), EXTRA_MODEL_ARGS="max_num_frames=8,fps=1"
    )
    assert proc.returncode == 0, proc.stderr
    argv = fake.lmms["argv"]
    assert option(argv, "--model") == "qwen2_5_vl"
    assert option(argv, "--model_args") == (
        "pretrained=ckpt/x,attn_implementation=sdpa,device=cpu,device_map=cpu,max_num_frames=8,fps=1"
    )
    assert option(argv, "--tasks") == "task_a,task_b"
    assert option(argv, "--limit") == "3"
    assert option(argv, "--include_path") == str(TASK_DIR.parent)
    assert option(argv, "--output_path") == str(fake.out)
    assert fake.lmms["reader"] == "decord"
    assert fake.launch is None  # one plain process on CPU, no accelerate
    assert "DEVICE=cpu: using attn_implementation=sdpa" in proc.stderr
    assert "results: " in proc.stdout and "task_a: accuracy=50" in proc.stdout


def test_defaults_include_the_shipped_tasks_and_empty_include_path_means_none(fake):
    assert fake.run(DEVICE="cpu").returncode == 0
    assert option(fake.lmms["argv"], "--include_path") == str(ROOT / "lmms_tasks")
    assert option(fake.lmms["argv"], "--limit") is None
    assert fake.run(DEVICE="cpu", INCLUDE_PATH="").returncode == 0
    assert "--include_path" not in fake.lmms["argv"]
    proc = fake.run(DEVICE="cpu", INCLUDE_PATH="no/such/folder")
    assert proc.returncode != 0 and "INCLUDE_PATH=no/such/folder: no such folder" in proc.stderr


def test_gpu_run_goes_through_accelerate_and_picks_sdpa_without_flash_attn(fake):
    proc = fake.run("ckpt/x", str(fake.out), "2", "task_a", PORT="29611", LMMS_EVAL_ARGS="--force_simple --gen_kwargs max_new_tokens=4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert fake.launch[:4] == ["--num_processes", "2", "--main_process_port", "29611"]
    assert fake.launch[4:6] == ["-m", "lmms_eval"]
    assert option(fake.lmms["argv"], "--model_args") == "pretrained=ckpt/x,attn_implementation=sdpa"
    assert "flash-attn is not importable" in proc.stderr and "using attn_implementation=sdpa" in proc.stderr
    assert fake.lmms["rest"] == ["--force_simple"]
    assert option(fake.lmms["argv"], "--gen_kwargs") == "max_new_tokens=4"


def test_flash_attention_2_when_flash_attn_imports_and_attn_overrides(fake):
    proc = fake.run("ckpt/x", str(fake.out), "1", "task_a", pythonpath=[fake.flash_attn])
    assert proc.returncode == 0, proc.stderr
    assert "attn_implementation=flash_attention_2" in option(fake.lmms["argv"], "--model_args")
    assert "flash-attn" not in proc.stderr
    assert fake.run("ckpt/x", str(fake.out), "1", "task_a", ATTN="eager").returncode == 0
    assert "attn_implementation=eager" in option(fake.lmms["argv"], "--model_args")
    proc = fake.run(ATTN="flash")
    assert proc.returncode != 0 and "ATTN must be" in proc.stderr


def test_training_budgets_become_model_args(fake):
    assert (
        fake.run(DEVICE="cuda:1", MAX_NUM_FRAMES="32", MIN_PIXELS="100352", MAX_PIXELS="602112").returncode
        == 0
    )
    assert option(fake.lmms["argv"], "--model_args") == (
        "pretrained=ckpt/x,attn_implementation=sdpa,device=cuda:1,device_map=cuda:1,"
        "max_num_frames=32,min_pixels=100352,max_pixels=602112"
    )


def test_exit_nonzero_when_lmms_eval_exits_0_without_results(fake):
    proc = fake.run(DEVICE="cpu", FAKE_LMMS_MODE="nothing")
    assert proc.returncode != 0
    assert "wrote no results file" in proc.stderr


def test_an_older_results_file_does_not_count(fake):
    assert fake.run(DEVICE="cpu").returncode == 0  # leaves a complete results file in OUT
    proc = fake.run(DEVICE="cpu", FAKE_LMMS_MODE="nothing")
    assert proc.returncode != 0 and "wrote no results file" in proc.stderr


def test_exit_nonzero_when_a_task_is_missing(fake):
    proc = fake.run(DEVICE="cpu", FAKE_LMMS_MODE="missing")
    assert proc.returncode != 0
    assert "lack task(s) task_b" in proc.stderr


def test_lmms_eval_failure_is_reported(fake):
    proc = fake.run(DEVICE="cpu", FAKE_LMMS_MODE="fail")
    assert proc.returncode != 0 and "lmms-eval failed with exit status 3" in proc.stderr


def test_patterns_and_tags_count_as_present(fake):
    assert fake.run("ckpt/x", str(fake.out), "", "task_*", DEVICE="cpu").returncode == 0
    # a tag (lmms-eval expands it into its tasks; the results list the tasks and their configs the tag)
    assert (
        fake.run("ckpt/x", str(fake.out), "", "task_a", DEVICE="cpu", FAKE_LMMS_TAG="my_tag").returncode == 0
    )
    assert (
        json.loads(next(fake.out.glob("*/*_results.json")).read_text())["configs"]["task_a"]["tag"]
        == "my_tag"
    )


def test_refuses_cpu_with_several_processes_and_a_python_without_lmms_eval(fake, tmp_path):
    proc = fake.run("ckpt/x", str(fake.out), "2", "task_a", DEVICE="cpu")
    assert proc.returncode != 0 and "DEVICE=cpu runs one process" in proc.stderr
    if importlib.util.find_spec("lmms_eval") is None:  # this venv has none: point PYTHONPATH elsewhere
        env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
        env.update(LMMS_PYTHON=sys.executable)
        proc = subprocess.run(["bash", str(SCRIPT), "ckpt", str(tmp_path / "o")], env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert proc.returncode != 0 and "lmms-eval is not installed" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# The shipped tasks


def load_utils():
    """lmms_tasks/swim_bench_q/utils.py, loaded from its path as lmms-eval's `!function utils.x` does."""
    spec = importlib.util.spec_from_file_location("utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Function:
    def __init__(self, name: str):
        self.name = name


def _task_yaml(path: Path) -> dict:
    """A task YAML with its include resolved; ``!function`` tags kept as names."""
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: _Function(ld.construct_scalar(node)))
    config = yaml.load(path.read_text(), Loader=loader)  # noqa: S506 (a SafeLoader subclass)
    if "include" in config:
        config = {**_task_yaml(path.parent / config.pop("include")), **config}
    return config


@pytest.mark.parametrize("name", ["swim_synth_bench_q", "videorefer_bench_q_nl"])
def test_task_yamls_name_existing_functions_and_source_files(name):
    utils = load_utils()
    config = _task_yaml(TASK_DIR / f"{name}.yaml")
    assert config["task"] == name and config["dataset_path"] == "json"
    functions = [v for v in config.values() if isinstance(v, _Function)]
    functions += [m["aggregation"] for m in config["metric_list"]]
    assert len(functions) == 11
    for f in functions:
        module, attr = f.name.split(".")
        assert module == "utils" and callable(getattr(utils, attr)), f.name
    source = TASK_DIR / config["dataset_kwargs"]["data_files"]["test"]
    (row,) = [json.loads(line) for line in source.read_text().splitlines()]
    assert row["task"] == name and row["json_env"] and row["videos_env"]


@pytest.fixture(scope="module")
def synth_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthConfig(), seed=0, counts={"bench_q": 5})
    return out


def source_rows(name: str) -> datasets.Dataset:
    """The task's source file as lmms-eval hands it to process_docs (``dataset_path: json``, one row)."""
    lines = (TASK_DIR / "sources" / f"{name}.jsonl").read_text().splitlines()
    return datasets.Dataset.from_list([json.loads(line) for line in lines])


def test_synthetic_task_docs_prompt_visual_and_scoring(synth_bench, monkeypatch, tmp_path):
    utils = load_utils()
    monkeypatch.setenv("SWIM_SYNTH_DATA", str(synth_bench))  # the folder: bench_q.json is found in it
    monkeypatch.delenv("SWIM_SYNTH_VIDEOS", raising=False)
    monkeypatch.setenv("SWIM_LMMS_VIDEO_CACHE", str(tmp_path / "cache"))
    docs = utils.process_docs(source_rows("swim_synth_bench_q"))
    assert len(docs) == 5
    items, _ = build_items(load_bench(synth_bench / "bench_q.json", "bench_q")[0])
    doc = docs[0]
    assert utils.doc_to_text(doc) == items[0].prompt  # swim eval bench-q's prompt, tags stripped
    assert "<ins>" not in doc["prompt"] and doc["prompt"].endswith("from the given choices directly.")
    assert utils.doc_to_visual(doc) == [str(synth_bench / "videos" / "bench_q_00000.mp4")]  # an mp4 as it is
    assert not (tmp_path / "cache").exists()
    assert utils.doc_to_target(doc) == items[0].gt

    right = utils.process_results(doc, [f"({doc['gt']})"])
    wrong = utils.process_results(doc, ["no idea"])
    assert set(right) == {"accuracy", "basic_questions", "sequential_questions", "relationship_questions",
                          "reasoning_questions", "future_predictions"}  # fmt: skip
    assert right["accuracy"]["correct"] and right["accuracy"]["score"] == 100.0
    assert wrong["accuracy"]["pred"] is None and wrong["accuracy"]["parse"] == "unparsed"
    assert wrong["accuracy"]["score"] == 0.0
    assert utils.aggregate_accuracy([right["accuracy"], wrong["accuracy"]]) == 50.0
    assert doc["type"] == "Basic Questions"
    assert utils.aggregate_basic_questions([right["basic_questions"]]) == 100.0
    assert utils.aggregate_future_predictions([right["future_predictions"]]) is None  # no such question


def test_missing_environment_variable_and_missing_videos_are_named(synth_bench, monkeypatch, tmp_path):
    utils = load_utils()
    monkeypatch.delenv("SWIM_SYNTH_DATA", raising=False)
    with pytest.raises(ValueError, match="set SWIM_SYNTH_DATA"):
        utils.process_docs(source_rows("swim_synth_bench_q"))
    monkeypatch.setenv("SWIM_SYNTH_DATA", str(synth_bench / "bench_q.json"))
    monkeypatch.setenv("SWIM_SYNTH_VIDEOS", str(tmp_path))  # the wrong video folder
    with pytest.raises(FileNotFoundError, match=r"5 of 5 videos are missing .*bench_q_00000\.mp4"):
        utils.process_docs(source_rows("swim_synth_bench_q"))
    monkeypatch.setenv("SWIM_SYNTH_VIDEOS", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="SWIM_SYNTH_VIDEOS=.*no such folder"):
        utils.process_docs(source_rows("swim_synth_bench_q"))


def test_official_format_bench_q_with_a_frame_folder(monkeypatch, tmp_path):
    """Hand-made records in VideoRefer-Bench-Q's format (docs/data_formats.md): a DAVIS-like JPEG folder with
    odd frame sides, an original-format question, and a malformed record that is left out."""
    utils = load_utils()
    frames = tmp_path / "videos" / "DAVIS" / "JPEGImages" / "480p" / "aerobatics"
    frames.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for t in range(6):
        Image.fromarray(rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)).save(frames / f"{t:05d}.jpg")
    records = [
        {"id": 0, "video": "DAVIS/JPEGImages/480p/aerobatics", "Question": "What is the <ins>pilot</ins> not wearing?",
         "type": "Basic Questions", "options": ["(A) A helmet", "(B) A hat", "(C) Sunglasses", "(D) A watch"],
         "Answer": "(A) A helmet", "frame_idx": "3",
         "annotation": [{"0": {"segmentation": {"size": [45, 61], "counts": "abc"}}}]},
        {"id": "q1", "video": "DAVIS/JPEGImages/480p/aerobatics", "type": "Relationship Questions",
         "Question": "Where is <object0><region> relative to <object1><region>?",
         "options": ["(A) Left", "(B) Right"], "Answer": "(B) Right"},
        {"id": 2, "video": "DAVIS/JPEGImages/480p/aerobatics", "Question": "Broken?", "options": [], "Answer": "(A)"},
    ]  # fmt: skip
    bench = tmp_path / "bench" / "refined-VideoRefer-Bench-Q.json"
    bench.parent.mkdir()
    bench.write_text(json.dumps(records))
    monkeypatch.setenv(
        "VIDEOREFER_BENCH_Q", str(bench.parent)
    )  # the folder: the refined file's name is known
    monkeypatch.setenv("VIDEOREFER_BENCH_Q_VIDEOS", str(tmp_path / "videos"))
    monkeypatch.setenv("SWIM_LMMS_VIDEO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SWIM_LMMS_FOLDER_FPS", raising=False)

    docs = utils.process_docs(source_rows("videorefer_bench_q_nl"))
    assert [d["id"] for d in docs] == ["0", "q1"]  # the malformed record is left out
    assert utils.doc_to_text(docs[0]).splitlines() == [
        "What is the pilot not wearing?", "(A) A helmet", "(B) A hat", "(C) Sunglasses", "(D) A watch",
        "Answer with the option's letter from the given choices directly.",
    ]  # fmt: skip
    assert utils.doc_to_text(docs[1]).startswith("Where is object 0 relative to object 1?")

    (video,) = utils.doc_to_visual(docs[0])
    assert video.endswith(".mp4") and Path(video).parent == tmp_path / "cache"
    info = probe_video(video)
    assert (info.num_frames, info.height, info.width) == (6, 46, 62)  # odd sides padded for yuv420p
    assert info.fps == pytest.approx(24.0)
    mtime = Path(video).stat().st_mtime_ns
    assert utils.doc_to_visual(docs[1]) == [video] and Path(video).stat().st_mtime_ns == mtime  # encoded once
    assert utils.process_results(docs[0], ["The answer is A."])["accuracy"]["correct"]
    assert utils.process_results(docs[1], ["A hat"])["accuracy"]["pred"] is None

    monkeypatch.setenv("SWIM_LMMS_FOLDER_FPS", "6")  # another rate is another cached video
    (slow,) = utils.doc_to_visual(docs[0])
    assert slow != video and probe_video(slow).fps == pytest.approx(6.0)
