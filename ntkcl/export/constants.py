"""File names and format markers of an export folder (one place for each name).

The learned state and its description have ntkcl's own names: no method's export is a PEFT adapter (their
multi-task adapters, prompts, heads and merged deltas do not map onto one PEFT LoRA), so PEFT's file names
would make PEFT tools misread them. Exports before format 4 used PEFT's names; they are still read.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_NAME = "ntkcl_model.safetensors"
CONFIG_NAME = "ntkcl_config.json"
LEGACY_NAMES = {WEIGHTS_NAME: "adapter_model.safetensors", CONFIG_NAME: "adapter_config.json"}
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
# Format 4 renamed the two files of LEGACY_NAMES.
EXPORT_FORMAT = 4
CHECKSUMS_FORMAT = 3
EXPORT_KIND = "export"
LIBRARY_NAME = "ntkcl"


def export_path(folder: Path, name: str) -> Path:
    """`folder / name`, or the name that file had before format 4 where only that one is there."""
    path = folder / name
    legacy = LEGACY_NAMES.get(name)
    if legacy is not None and not path.exists() and not path.is_symlink() and (folder / legacy).exists():
        return folder / legacy
    return path
