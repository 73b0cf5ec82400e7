"""Test plugin: importing it writes ``marker.txt`` beside it (to see whether, and which copy, was imported)."""

from pathlib import Path

(Path(__file__).parent / "marker.txt").write_text(__file__)
