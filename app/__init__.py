"""``python -m app`` from the repository root: the demo now lives in :mod:`dit_sparse.tools.app` (packaged, so
``dit-sparse demo`` works from any folder); this shim keeps the old command working."""

from dit_sparse.tools.app import *  # noqa: F401,F403
