"""Plumbing every other package uses: one-line errors, the CPU kernel pin, params, output paths, files
(atomic writes, JSON, staged stage outputs) and provenance.

May import: srmodels.archs (params validation checks variant names and input sizes against it).
"""
