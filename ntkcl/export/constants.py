"""File names and format markers of an export folder (one place for each name)."""

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
METRICS_NAME = "metrics.json"
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, METRICS_NAME)
EXPORT_FORMAT = 1
LIBRARY_NAME = "ntkcl"
