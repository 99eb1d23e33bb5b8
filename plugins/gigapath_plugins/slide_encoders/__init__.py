"""Slide encoders / aggregators (slide_encoder hook)."""
