"""Tests of the whole project: hostile inputs, fuzzing, the determinism suite, kills and resumes, the example project, Nix, the layout, the bench."""
