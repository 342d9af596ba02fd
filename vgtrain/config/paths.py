"""Where vgtrain finds its Hydra configs."""

from __future__ import annotations

import os
from pathlib import Path

# conf/ lives at the repository root beside the package (install with `pip install -e .`);
# VGTRAIN_CONF_DIR points elsewhere, e.g. at a copy holding your own experiments.
CONF_DIR = Path(os.environ.get("VGTRAIN_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))
