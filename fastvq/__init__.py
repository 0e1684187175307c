"""fastvq: fused vector quantization for PyTorch, without the N×K distance matrix."""
from .dispatch import BackendNotSupportedError, available_backends, empty_cache, unavailable_reasons
from .functional import ema_stats, nearest_code, nearest_codes, quantize
from .kmeans import kmeans
from .nn import CodebookStats, FastVectorQuantizer, GroupedResidualVQ, ResidualVQ

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "CodebookStats",
    "FastVectorQuantizer",
    "GroupedResidualVQ",
    "ResidualVQ",
    "available_backends",
    "ema_stats",
    "empty_cache",
    "kmeans",
    "nearest_code",
    "nearest_codes",
    "quantize",
    "unavailable_reasons",
]
