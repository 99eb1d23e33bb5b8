"""Task heads: slide-level classifiers on tile tokens (ABMIL) or on a slide embedding (linear) — SPEC §4."""
