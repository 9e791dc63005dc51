"""scripts/perf_report.py: the README Performance sections are generated from the saved JSON and
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


def _readme(tmp_path: Path, gpu: bool) -> Path:
    text = "# title\n\n## Performance\n\n<!-- perf:start -->\nstale\n<!-- perf:end -->\n\nkept\n"
    if gpu:
        text += "\n## GPU measurements\n\n<!-- perf-gpu:start -->\n<!-- perf-gpu:end -->\n"
    path = tmp_path / "README.md"
    path.write_text(text)
    return path


def test_sections_are_written_then_checked(perf_report, tmp_path):
    readme = _readme(tmp_path, gpu=True)
    args = ["--readme", str(readme), "--json", str(RESULTS / "latest.json"),
            "--gpu-json", str(RESULTS / "gpu-h100.json")]
    assert perf_report.main(args + ["--check"]) == 1          # stale
    assert perf_report.main(args) == 0
    text = readme.read_text()
    assert "stale" not in text and "kept" in text
    assert "GPU figures (TFLOP/s over visible elements, GB/s) are under *GPU measurements*" in text
    gpu = text[text.index("<!-- perf-gpu:start -->"):]
    assert "Every figure in this section was measured on NVIDIA H100" in gpu
    assert "bench/results/gpu-h100.json" in gpu
    assert perf_report.main(args + ["--check"]) == 0
    readme.write_text(text.replace("| attention |", "| attention (edited) |", 1))
    assert perf_report.main(args + ["--check"]) == 1          # drift is caught


def test_without_gpu_results_the_cpu_section_says_so(perf_report, tmp_path):
    readme = _readme(tmp_path, gpu=False)
    args = ["--readme", str(readme), "--json", str(RESULTS / "latest.json"),
            "--gpu-json", str(tmp_path / "absent.json")]
    assert perf_report.main(args) == 0
    assert "No GPU figures exist yet" in readme.read_text()


def test_missing_markers_print_instead_of_write(perf_report, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    json_copy = tmp_path / "latest.json"
    shutil.copy(RESULTS / "latest.json", json_copy)
    assert perf_report.main(["--readme", str(readme), "--json", str(json_copy),
                             "--gpu-json", str(tmp_path / "absent.json"), "--check"]) == 1
    assert readme.read_text() == "no markers here\n"
    assert "| suite | case |" in capsys.readouterr().out
