"""omnimae-pl."""
