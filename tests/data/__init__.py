"""Tests of pipeline/data/ (tests/README.md maps each file to its module)."""
