"""Machine-readable specifications shipped with loraformats (data only; see specs/README.md)."""
