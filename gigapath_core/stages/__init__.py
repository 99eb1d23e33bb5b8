"""Pipeline stages; each reads and writes through gigapath_core.store."""
