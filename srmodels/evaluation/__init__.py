"""Fusing and scoring the scored sets (the test and score stages, ``srmodels eval``), the fusion's
baselines and oracles, tables, plots and panels, and seed-sweep summaries.

May import: srmodels.core, srmodels.archs, srmodels.data, srmodels.metrics, srmodels.models.
"""
