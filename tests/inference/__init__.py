"""Tests of pipeline/inference/ (tests/README.md maps each file to its module)."""
