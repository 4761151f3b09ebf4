"""Tests of pipeline/exact/ (tests/README.md maps each file to its module)."""
