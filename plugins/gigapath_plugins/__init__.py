"""Plugins bundled with gigapath. Each module registers through the `gigapath` entry-point group."""
