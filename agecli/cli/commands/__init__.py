"""Typer commands, one module per stage. Each module exposes `register(app)`; commands only
parse options and call the library function of their stage."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit_json(obj: Any) -> None:
    """Print one machine-readable JSON object on stdout (the `--json` contract)."""
    from agecli.rundir import json_default

    sys.stdout.write(json.dumps(obj, indent=2, default=json_default) + "\n")
    sys.stdout.flush()
