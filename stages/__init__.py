"""The DVC stage scripts, run as ``python -m stages.<name>`` from the repository root (see dvc.yaml).

Run as modules, the stages import the ``srmodels`` of the checkout they run in (``dvc exp run --temp`` and
``--queue`` copies included), not whichever one is installed. Each imports ``stages._common`` first: it pins
the CPU kernels before torch loads.
"""
