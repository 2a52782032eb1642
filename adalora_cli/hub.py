"""Reaching the Hugging Face hub: when a run needs it and it cannot be reached (offline, `HF_HUB_OFFLINE` set, a
closed network), fail within seconds and name everything missing at once, instead of retrying each download
for half a minute and reporting the first. What the local cache holds still works offline.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from adalora_cli.errors import UserError

logger = logging.getLogger("adalora_cli")

PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class HubNeed:
    """Something a run would download: a model (repo id) or a dataset (name and configuration)."""

    kind: str  # "model" or "dataset"
    name: str
    config: str | None = None

    def __str__(self) -> str:
        return f"{self.kind} {self.name}" + (f" ({self.config})" if self.config else "")


def model_need(name: str) -> HubNeed | None:
    """The hub model `name` stands for, or None when it is a local folder or an embedded model."""
    from adalora_cli.models import EMBEDDED, LOCAL_PREFIXES

    if name in EMBEDDED or Path(name).expanduser().exists() or name.startswith(LOCAL_PREFIXES):
        return None
    return HubNeed("model", name)


def offline_by_setting() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable() -> bool:
    """Whether the hub answers an HTTP request within a few seconds (proxies and HF_ENDPOINT respected)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
        return True
    except Exception:  # no route, no DNS, a timeout, a proxy refusing: all mean unreachable
        return False


def go_offline() -> None:
    """Switch this process to the libraries' offline mode: files come from the local cache, no retries."""
    import datasets
    import huggingface_hub

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


def cached(need: HubNeed) -> bool:
    """Whether `need` is in the local cache (so that it loads offline)."""
    if need.kind == "model":
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(need.name, "config.json"), str)
    import datasets

    try:
        datasets.load_dataset_builder(need.name, need.config)
        return True
    except Exception:  # offline and not cached
        return False


def require(needs: list[HubNeed | None], model_advice: str | None = None) -> None:
    """Check, before any download, that everything the run needs from the hub can be had.

    Offline (by setting, or because the hub does not answer), whatever is not in the local cache is reported in
    one line; when everything is cached, the run goes on offline. `model_advice` names the models that fit the task
    (`Task.model_advice`); without it, any local folder or the embedded MiniLM-L6 is suggested.
    """
    needs = [need for need in needs if need is not None]
    if not needs:
        return
    if offline_by_setting():
        reason = "HF_HUB_OFFLINE is set"
    elif hub_reachable():
        return
    else:
        reason = "the Hugging Face hub cannot be reached"
    go_offline()
    missing = [str(need) for need in needs if not cached(need)]
    if missing:
        fixes = []
        if any(need.startswith("model") for need in missing):
            fixes.append(f"--model with a local folder of {model_advice}" if model_advice
                         else "--model with a local folder (or minilm-l6, the embedded MiniLM-L6)")
        if any(need.startswith("dataset") for need in missing):
            fixes.append("local data (--data-dir, or --train-file and --validation-file)")
        raise UserError(f"{reason} and the local cache lacks {', '.join(missing)}; give {' and '.join(fixes)}, "
                        "or connect and run again")
    logger.info("%s: using the local cache for %s", reason, ", ".join(str(n) for n in needs))
