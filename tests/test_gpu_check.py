"""scripts/gpu_check.py: its smoke (the same code paths on the CPU, tiny sizes) writes a report in which every
section ran or says why it was skipped; a crashing or hanging command is recorded, not raised."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from cli_helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sections(report: str) -> dict[str, str]:
    """Section letter -> its status line."""
    out = {}
    for letter, body in re.findall(r"^## ([a-f])\. .*?\n\n(.*?)\n", report, flags=re.M):
        out[letter] = body
    return out


def test_smoke_report_has_every_section_ran_or_skipped_with_a_reason(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--workdir", str(tmp_path / "w")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = out.read_text()
    assert report.startswith("# GPU check") and "| device | CPU (no CUDA device used) |" in report
    assert "| mode | smoke (CPU, tiny sizes) |" in report and "| torch / timm / lightning / python |" in report
    sections = _sections(report)
    assert sorted(sections) == list("abcdef"), report
    for letter, status in sections.items():
        match = re.fullmatch(r"\*\*(pass|ran|fail|skipped: .+)\*\* \(\d+ s\)", status)
        assert match, f"section {letter}: {status}"  # "failed: ..." (a crash) or a bare "skipped" would not match
    assert sections["a"].startswith("**pass")  # the fit ran every step of both modalities, losses finite
    assert sections["b"].startswith("**skipped: FSDP1 refuses the CPU")
    for name in ("c_base", "c_base_pad64", "c_base_cudagraphs", "f_huge_compile", "e_shipped", "e_find_unused"):
        assert (tmp_path / "w" / "logs" / f"{name}.log").exists(), name
    # the figures each section exists for
    assert "| c_base (end to end) |" in report and "| c_base_pad64 | video |" in report
    assert "compile-mode reduce-overhead" in report and "--decoder-head-pad 64" in report
    assert "augment_on worker:" in report and "of model-only at that mix; host ms per step: data_wait" in report
    # section d's JPEGs decoded on the device: the bench ran with the option (its log says so) and gave its row
    assert "augment_on device, image_decode device:" in report
    assert "augment_on device, image_decode device" in (tmp_path / "w" / "logs" / "d_base_jpeg.log").read_text()
    assert "find_unused_parameters=True takes" in report and "ddp_find_unused_parameters_true" in report
    assert "`f_huge_compile`: compiled in" in report
    assert "| MFU ViT-B image >= 40% | n/a" in report  # no peak is known for a CPU: not judged


def test_a_failing_or_hanging_command_is_recorded(gpu_check, tmp_path):
    section = gpu_check.Section("x", {"workdir": str(tmp_path), "smoke": True})
    rc, text = section.run("boom", [sys.executable, "-c", "print('starting'); raise RuntimeError('CUDA error: boom')"],
                           timeout=60)
    assert rc == 1 and gpu_check.first_error_line(text) == "RuntimeError: CUDA error: boom"
    rc, _ = section.run("hang", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    assert rc == 124
    gpu_check.fail(section, "hang", rc, "")
    assert section.data["status"] == "failed" and section.data["reason"] == "timed out (hang)"
    assert len(section.data["commands"]) == 2 and (tmp_path / "logs" / "boom.log").exists()


def test_end_to_end_fraction_is_against_model_only_at_the_same_mix(gpu_check):
    rows = [{"impl": "ours", "modality": "image", "compiled": "blocks", "samples_per_s": 1000.0},
            {"impl": "ours", "modality": "video", "compiled": "blocks", "samples_per_s": 100.0},
            {"impl": "ours", "modality": "image", "compiled": False, "samples_per_s": 800.0},
            {"impl": "ours-e2e", "compiled": "blocks", "samples": {"image": 900, "video": 100},
             "samples_per_s": 250.0}]
    row, fraction = gpu_check.e2e_fraction({"rows": rows})
    # model-only: 900 / 1000 + 100 / 100 = 1.9 s for 1000 samples; end to end: 4 s
    assert row is rows[-1] and fraction == pytest.approx(1.9 / 4.0)


def test_a_section_that_cannot_finish_is_left_for_a_rerun(gpu_check):
    # on a GPU a section needs half its cap (c: 135 of 270 s), so that the budget is not spent on a timeout
    assert gpu_check.too_little_left("c", 120, smoke=False) and not gpu_check.too_little_left("c", 140, smoke=False)
    assert gpu_check.too_little_left("a", 29, smoke=False) and not gpu_check.too_little_left("a", 45, smoke=False)
    assert not gpu_check.too_little_left("c", 31, smoke=True)  # the smoke times nothing: 30 s will do
    assert sorted(gpu_check.RUN_ORDER) == sorted(gpu_check.CAPS) == list("abcdef")
