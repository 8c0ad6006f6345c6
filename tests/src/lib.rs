//! End-to-end tests of the whole service live under `tests/tests/`.
