"""Layer 2, torch in one process, no Ray: five packages, each with a declared face.

- ``io``: inputs as ``Source`` values, the Arrow codec, rows, state files, file systems.
- ``model``: ``TorchModel``, its decorator, files and identity.
- ``train``: one worker's training loop, its context, recipe and resume checkpoints.
- ``tracking``: a run's result, directory, learning curve and loggers, on the driver.
- ``infer``: batch inference of one unit, its output layout and report.
"""
