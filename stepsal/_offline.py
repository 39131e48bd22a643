"""Offline defaults, applied before anything imports huggingface_hub.

stepsal never downloads unless the user asks for it: these variables are only set when the user
has not set them. To allow downloads, set ``HF_HUB_OFFLINE=0`` before importing stepsal and pass
``allow_download=True`` to :func:`stepsal.load_model`.
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
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
