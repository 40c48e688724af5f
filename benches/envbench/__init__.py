"""envlane's benchmark harness (benches/run.py is the entry point)."""
