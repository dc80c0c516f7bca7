"""The settings a pass-rate table's numbers depend on, kept beside the table in the service's state.

A service restarted on the same `--state-dir` resumes its table. If it now renders prompts with
another template, grades with another verifier, or samples another K, response length or model,
the resumed estimates measure something else (an all-zero table from wrong flags would silently
stay in force), so the restart is refused unless the user says the change is intended.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nemo_paced.atomic import atomic_write_json

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
TABLE_FILE = "passrates.jsonl"


class SettingsChanged(ValueError):
    """The state directory's table was estimated under other settings."""


def check_resumed(state_dir: str | Path, current: dict[str, Any], allow_change: bool = False) -> None:
    """Compare `current` with the settings recorded in `state_dir`, then record `current`. A difference
    while a table exists raises SettingsChanged naming every changed setting, or, with `allow_change`,
    is logged as a warning."""
    state = Path(state_dir)
    path = state / SETTINGS_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    has_table = (state / TABLE_FILE).exists()
    if saved is not None and has_table:
        changed = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
        if changed:
            listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
            message = f"{state} holds a pass-rate table estimated with other settings ({listed})"
            if not allow_change:
                raise SettingsChanged(f"{message}: its estimates would be resumed as if comparable. Give a new "
                                      "--state-dir, or --allow-settings-change to keep the table and its jobs")
            log.warning("%s; kept because --allow-settings-change was given", message)
    state.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, current)
