"""Calibration and validation data: sources (image folders, tables, npy/npz), preprocessing, batching."""

from quantkit.data.batching import Batch, batches
from quantkit.data.preprocess import PreprocessSpec
from quantkit.data.sources import Sample, open_source

__all__ = ["Batch", "PreprocessSpec", "Sample", "batches", "open_source"]
