"""The trained ensemble as an MLflow pyfunc model, logged from code.

MLflow's "models from code": the logged model is this file and the ensemble's safetensors file (an artifact);
loading it runs this file, and ``load_context`` reads the ensemble with
:func:`srmodels.models.ensemble.load_ensemble` (JSON and raw tensors only). No pickled object is stored or
loaded, unlike a logged ``PythonModel`` instance.

``predict`` takes uint8 RGB images (N, H, W, 3), or one (H, W, 3), and returns their 4x fused SR images as uint8
(N, 4H, 4W, 3): the pixels of the test stage's PNGs, bit for bit on the CPU kernels the pipeline ran with
(``cpu_isa`` in the ensemble's ``kernels``, pinned before torch loads: ``srmodels.core.isa``). Images of
different sizes go in one call each.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

log = logging.getLogger(__name__)


class EnsembleModel(PythonModel):
    def load_context(self, context):
        from srmodels.core import isa
        from srmodels.core.runtime import set_threads
        from srmodels.models.ensemble import load_ensemble

        self.ensemble = load_ensemble(context.artifacts["ensemble"])
        kernels = self.ensemble.kernels
        if kernels.get("threads"):
            set_threads(kernels["threads"])  # the pipeline's intra-op threads: a reduction's order can depend on them
        wanted = isa.environment(kernels["cpu_isa"]) if kernels.get("cpu_isa") else {}
        if any(os.environ.get(k) != v for k, v in wanted.items()):
            log.info("the ensemble's pipeline ran on %s kernels, this process is not pinned to them (%s): the pixels "
                     "may differ from the test stage's in the last bit", kernels["cpu_isa"],
                     " ".join(f"{k}={v}" for k, v in wanted.items()))

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads type hints as a schema
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
        for i, img in enumerate(images):
            self.ensemble.check_input(img.shape[0], img.shape[1], f"image {i}")
        return np.stack([self.ensemble.upscale_image(img) for img in images])


mlflow.models.set_model(EnsembleModel())
