"""embedpipe: cache pretrained-backbone embeddings to HDF5, then fit classical heads on a CPU."""

__version__ = "0.1.0"
