"""The one training loop (``loop.fit``) and its two jobs: fine-tuning a backbone and training the fusion net;
EMA and DDP as small objects that do nothing when off.

May import: srmodels.core, srmodels.archs, srmodels.data, srmodels.metrics, srmodels.models.
"""
