"""LightningModules: loop logic only (no file formats, no model internals)."""
