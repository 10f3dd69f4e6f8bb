"""Networks as the pipeline uses them: an architecture with RGB [0, 1] in and out (``SRModel``), safe
checkpoint loading, the fusion nets, tiled and x8 inference, the member-output cache, CPU fast paths, costs, and the trained
ensemble as one file.

May import: srmodels.core, srmodels.archs, srmodels.data.
"""
