"""Datasets shipped with qcache (see PROVENANCE.md for sources and licences)."""
