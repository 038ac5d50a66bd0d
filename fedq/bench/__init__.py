"""Benchmarks: commands that print tables and write JSON. They measure; tests assert."""
