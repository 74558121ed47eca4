"""Command-line entry points: zoo-train, zoo-test, zoo-infer, zoo-export, zoo-convert (tools/*.py wrap them)."""
