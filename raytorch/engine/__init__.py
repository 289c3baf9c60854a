"""Layer 2, torch in one process: ``TorchModel``, the training loop, state files, the Arrow codec,
file systems and atomic writes. Nothing here imports Ray.
"""
