"""The callbacks of microgpt's recipes, one job per module; ``microgpt.callbacks.X`` names each of them (as the
recipes in ``configs/`` do).

* ``checkpointing``: ``RunCheckpoint`` (``last.ckpt``, saving on SIGTERM and Ctrl-C) and ``AtomicCheckpointIO``.
* ``sampling``: ``SampleNames``, and the shares of names that are new.
* ``monitoring``: ``RunLogger`` (the TensorBoard folder), ``LearningRateCurves``, ``Throughput``.
* ``predictions``: ``WriteNames``, the prediction writer.
* ``ema``: ``EMA``, the moving average of the weights.
* ``threads``: ``Threads``, torch's CPU threads for the run.
"""

from microgpt.callbacks.checkpointing import AtomicCheckpointIO, RunCheckpoint, Stopped
from microgpt.callbacks.ema import EMA
from microgpt.callbacks.monitoring import LearningRateCurves, RunLogger, Throughput
from microgpt.callbacks.predictions import WriteNames
from microgpt.callbacks.sampling import SampleNames, log_samples, novelty, report_novelty
from microgpt.callbacks.threads import Threads

LearningRateMonitor = LearningRateCurves  # its class path in recipes written before the rename; by its short name,
# LearningRateMonitor is Lightning's own

__all__ = ["EMA", "AtomicCheckpointIO", "LearningRateCurves", "RunCheckpoint", "RunLogger", "SampleNames", "Stopped",
           "Threads", "Throughput", "WriteNames", "log_samples", "novelty", "report_novelty"]
