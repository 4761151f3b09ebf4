"""Tests of pipeline/audit/ (tests/README.md maps each file to its module)."""
