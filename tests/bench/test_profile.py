"""``--profile`` on the CPU: a kernel table per modality, written to ``--out-dir``."""

from __future__ import annotations

import omnimae_pl.bench


def test_profile_tables_on_cpu(tiny, tmp_path):
    result = omnimae_pl.bench.main([*tiny, "--modality", "image", "--profile", "--out-dir", str(tmp_path)])
    table = result["profiles"]["image"]
    assert table.startswith("== profile image batch 2 (eager), 3 steps") and "Self CPU" in table
    assert (tmp_path / "profile_tiny_image.txt").read_text() == table
