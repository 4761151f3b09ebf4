"""Tests of pipeline/export/ (tests/README.md maps each file to its module)."""
