"""Datasets: YOLO and COCO parsing, checks, augmentation and the demo generator.

Parsing, checks, transforms and the synthetic generator are torch-free; only `dfineseg.data.dataset`
(SegmentationDataset, collate_fn) imports torch, so it is not imported here.
"""

from dfineseg.data.index import DatasetError, DatasetIndex, ImageRecord, Instance, Problem
from dfineseg.data.loader import dataset_splits, detect_format, load_index
from dfineseg.infer.image_io import ImageReadError, probe_image, read_image

__all__ = [
    "DatasetError",
    "DatasetIndex",
    "ImageReadError",
    "ImageRecord",
    "Instance",
    "Problem",
    "dataset_splits",
    "detect_format",
    "load_index",
    "probe_image",
    "read_image",
]
