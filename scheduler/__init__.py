"""Cluster scheduling: `local` (one instance) and `splitwise` (Redis). Not built yet."""
