"""scripts/perf_report.py: the docs/ performance pages are generated from the saved JSON and
``--check`` catches drift."""
import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@pytest.fixture(scope="module")
def perf_report():
    spec = importlib.util.spec_from_file_location("perf_report", ROOT / "scripts" / "perf_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs(tmp_path: Path, gpu: bool) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "performance.md").write_text("# title\n\n<!-- perf:start -->\nstale\n<!-- perf:end -->\n\nkept\n")
    if gpu:
        (docs / "gpu.md").write_text("# GPU measurements\n\nprose\n\n<!-- perf-gpu:start -->\n"
                                     "<!-- perf-gpu:end -->\n")
    return docs


def test_sections_are_written_then_checked(perf_report, tmp_path):
    docs = _docs(tmp_path, gpu=True)
    args = ["--docs", str(docs), "--json", str(RESULTS / "latest.json"),
            "--gpu-json", str(RESULTS / "gpu-h100.json")]
    assert perf_report.main(args + ["--check"]) == 1          # stale
    assert perf_report.main(args) == 0
    text = (docs / "performance.md").read_text()
    assert "stale" not in text and "kept" in text
    assert "GPU figures (TFLOP/s over visible elements, GB/s) are under *GPU measurements*" in text
    gpu = (docs / "gpu.md").read_text()
    assert gpu.startswith("# GPU measurements\n\nprose\n")
    gpu = gpu[gpu.index("<!-- perf-gpu:start -->"):]
    assert "Every figure in this section was measured on NVIDIA H100" in gpu
    assert "bench/results/gpu-h100.json" in gpu
    assert perf_report.main(args + ["--check"]) == 0
    (docs / "performance.md").write_text(text.replace("| attention |", "| attention (edited) |", 1))
    assert perf_report.main(args + ["--check"]) == 1          # drift is caught


def test_gpu_runs_get_one_section_each_without_repeated_tables(perf_report, tmp_path):
    docs = _docs(tmp_path, gpu=True)
    runs = [RESULTS / "gpu-h100.json", RESULTS / "gpu-h200.json"]
    assert perf_report.main(["--docs", str(docs), "--json", str(RESULTS / "latest.json"),
                             "--gpu-json", *map(str, runs)]) == 0
    gpu = (docs / "gpu.md").read_text()
    assert gpu.count("\n## NVIDIA H100") == 1 and gpu.count("\n## NVIDIA H200") == 1
    assert gpu.index("\n## NVIDIA H100") < gpu.index("\n## NVIDIA H200")
    assert gpu.count("| suite | case | ours |") == 2                  # each run's ratio table
    tables = [block for block in gpu.split("\n\n") if block.startswith("|")]
    assert len(tables) == len(set(tables))                            # no table twice
    # the H200 run's side tables equal the H100's: they point to it
    assert "Same as in the run on NVIDIA H100" in gpu[gpu.index("\n## NVIDIA H200"):]


def test_without_gpu_results_the_cpu_section_says_so(perf_report, tmp_path):
    docs = _docs(tmp_path, gpu=False)
    args = ["--docs", str(docs), "--json", str(RESULTS / "latest.json"),
            "--gpu-json", str(tmp_path / "absent.json")]
    assert perf_report.main(args) == 0
    assert "No GPU figures exist yet" in (docs / "performance.md").read_text()
    assert not (docs / "gpu.md").exists()


def test_missing_markers_print_instead_of_write(perf_report, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "performance.md"
    page.write_text("no markers here\n")
    json_copy = tmp_path / "latest.json"
    shutil.copy(RESULTS / "latest.json", json_copy)
    assert perf_report.main(["--docs", str(docs), "--json", str(json_copy),
                             "--gpu-json", str(tmp_path / "absent.json"), "--check"]) == 1
    assert page.read_text() == "no markers here\n"
    assert "| suite | case |" in capsys.readouterr().out


def test_the_repository_docs_are_up_to_date(perf_report):
    assert perf_report.main(["--check"]) == 0
