"""ntkcl: parameter-efficient continual learning on pre-trained vision transformers.

The core method is NTK-CL (Liu et al., "Parameter-Efficient Fine-Tuning for Continual Learning: A Neural
Tangent Kernel Perspective", arXiv 2407.17120); baselines run on the same engine, data and metrics.
"""

__version__ = "0.1.0"
