"""Tests of pipeline/core/ (tests/README.md maps each file to its module)."""
