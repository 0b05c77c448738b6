"""ntkcl: parameter-efficient continual learning on pre-trained vision transformers.

The core method is NTK-CL (Liu et al., "Parameter-Efficient Fine-Tuning for Continual Learning: A Neural
Tangent Kernel Perspective", arXiv 2407.17120); baselines run on the same engine, data and metrics.
"""

__version__ = "0.1.0"

__all__ = ["ContinualModel", "__version__", "load_pretrained"]


def __getattr__(name: str):
    # Loading pulls in torch and timm; `import ntkcl` stays light until it is used.
    if name in ("ContinualModel", "load_pretrained"):
        from ntkcl import export

        return getattr(export, name)
    raise AttributeError(f"module 'ntkcl' has no attribute {name!r}")
