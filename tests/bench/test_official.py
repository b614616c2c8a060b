"""The out-of-tree import of the official model."""

from __future__ import annotations

import sys

import pytest

from omnimae_pl.bench.official import import_official


def test_import_official_stubs_hydra(tmp_path):
    """The out-of-tree import harness: a snapshot whose model code imports hydra, which is not installed."""
    pkg = tmp_path / "omnimae"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "omni_mae_model.py").write_text("import hydra\n\ndef vit_base_mae_pretraining(pretrained=True):\n"
                                           "    return 'built'\n")
    saved_path, saved = list(sys.path), {k: sys.modules.get(k) for k in ("hydra", "hydra.utils", "omnimae")}
    try:
        mod = import_official(str(tmp_path))
        assert mod.vit_base_mae_pretraining(pretrained=False) == "built"
        with pytest.raises(FileNotFoundError):
            import_official(str(tmp_path / "missing"))
    finally:
        sys.path[:] = saved_path
        for k in ("hydra", "hydra.utils", "omnimae", "omnimae.omni_mae_model"):
            sys.modules.pop(k, None)
        sys.modules.update({k: v for k, v in saved.items() if v is not None})
