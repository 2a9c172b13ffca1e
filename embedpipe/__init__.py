"""embedpipe: cache pretrained-backbone embeddings to HDF5, then fit classical heads on a CPU."""

__version__ = "0.1.0"

# The backbone with bundled offline ImageNet weights (see backbones.py); here so that modules
# that must not import torch (extract's no-op rerun path) can name it.
DEFAULT_MODEL = "tf_efficientnet_lite0"
