"""File names and format markers of an export folder (one place for each name)."""

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"
METRICS_NAME = "metrics.json"
# The file the Hub's default download query counts (for a library without its own query), and the one
# `huggingface_hub.ModelHubMixin` reads first: a short description pointing to the two files above.
HUB_CONFIG_NAME = "config.json"
# sha256 of every other export file but the card (which the Hub lets its owner edit), `sha256sum -c` format.
CHECKSUMS_NAME = "checksums.sha256"
CHECKED_FILES = (WEIGHTS_NAME, CONFIG_NAME, HUB_CONFIG_NAME, METRICS_NAME)
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, HUB_CONFIG_NAME, CARD_NAME, METRICS_NAME, CHECKSUMS_NAME)
# Format 3 added checksums.sha256; format 2 exports have the other five files and are read unverified.
EXPORT_FORMAT = 3
CHECKSUMS_FORMAT = 3
EXPORT_KIND = "export"
LIBRARY_NAME = "ntkcl"
