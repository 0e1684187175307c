"""The module layer: drop-in nn.Modules for vector-quantize-pytorch's classes, on fastvq's ops."""
from .grouped_residual import GroupedResidualVQ
from .residual import ResidualVQ
from .stats import CodebookStats
from .vector_quantizer import FastVectorQuantizer

__all__ = ["CodebookStats", "FastVectorQuantizer", "GroupedResidualVQ", "ResidualVQ"]
