"""Doctest collection skips the trainer adapters whose trainer is not installed."""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("transformers") is None:
    collect_ignore.append("src/haltpoint/integrations/transformers.py")
if (
    importlib.util.find_spec("lightning") is None
    and importlib.util.find_spec("pytorch_lightning") is None
):
    collect_ignore.append("src/haltpoint/integrations/lightning.py")
if importlib.util.find_spec("optuna") is None:
    collect_ignore.append("src/haltpoint/integrations/optuna.py")
