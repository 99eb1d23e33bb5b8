"""Slide readers (slide_reader hook)."""
