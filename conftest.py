"""Doctest collection skips the trainer adapters whose trainer is not installed; property tests
are repeatable."""

import importlib.util
import os

from hypothesis import settings

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

# Property tests draw the same examples on every run (seeded from each test's name), so that the
# suite a commit passed is the suite CI runs; `HYPOTHESIS_PROFILE=explore` draws fresh ones on
# every run, to hunt for new failures.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
