"""Offline by default, without touching the user's environment.

Importing stepsal changes no environment variable. stepsal's own loaders pass
``local_files_only=True`` to transformers unless the user asks for a download
(``load_model(..., allow_download=True)``), so they never reach the network on their own. The
command line, the Makefile and the test suite are programs rather than a library: they set
:data:`OFFLINE_DEFAULTS` for their own process with :func:`apply_offline_defaults`.
"""

import os

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "disabled",
}


def apply_offline_defaults() -> None:
    """Set the offline variables that the user has not set (for programs: the CLI, scripts)."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def hub_offline() -> bool:
    """Whether the user switched the Hugging Face hub off (``HF_HUB_OFFLINE=1``)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
