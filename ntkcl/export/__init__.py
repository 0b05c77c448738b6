"""Exports: a run as a PEFT-style folder, pushed to and loaded back from the Hugging Face Hub.

One module per concern, imported in one direction:

    constants    file names of an export folder
    document     ntkcl_config.json: built from a run directory, read back and checked
    card         the model card (README.md)
    folder       run directory -> export folder
    hub          push a folder to the Hub, download one back
    pretrained   export folder or Hub repo -> model (an nn.Module with from_pretrained / save_pretrained /
                 push_to_hub)
    evaluation   score a loaded export on a prepared stream
"""

from ntkcl.export.card import card_is_generated, render_card
from ntkcl.export.constants import (
    CARD_NAME,
    CONFIG_NAME,
    EXPORT_FILES,
    HUB_CONFIG_NAME,
    METRICS_NAME,
    WEIGHTS_NAME,
)
from ntkcl.export.document import build_export_config, read_export_config, task_infos
from ntkcl.export.evaluation import evaluate_pretrained
from ntkcl.export.folder import ExportResult, export_run
from ntkcl.export.pretrained import ContinualModel, load_pretrained

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "EXPORT_FILES",
    "HUB_CONFIG_NAME",
    "METRICS_NAME",
    "WEIGHTS_NAME",
    "ContinualModel",
    "ExportResult",
    "build_export_config",
    "card_is_generated",
    "evaluate_pretrained",
    "export_run",
    "load_pretrained",
    "read_export_config",
    "render_card",
    "task_infos",
]
