"""Task heads: slide-level classifiers on tile tokens (ABMIL) or on a slide embedding (linear) — Xu et al. 2024,
Methods: mutation prediction, cancer subtyping."""
