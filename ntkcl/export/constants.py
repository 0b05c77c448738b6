"""File names and format markers of an export folder (one place for each name)."""

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
METRICS_NAME = "metrics.json"
# The file the Hub's default download query counts (for a library without its own query), and the one
# `huggingface_hub.ModelHubMixin` reads first: a short description pointing to the two files above.
HUB_CONFIG_NAME = "config.json"
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, HUB_CONFIG_NAME, CARD_NAME, METRICS_NAME)
EXPORT_FORMAT = 2
LIBRARY_NAME = "ntkcl"
