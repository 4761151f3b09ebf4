"""Tests of pipeline/record/ (tests/README.md maps each file to its module)."""
