"""Tests of pipeline/train/ (tests/README.md maps each file to its module)."""
