import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# the shared test helpers: tests/utils.py, tests/tiny.py, tests/sync_guard.py and the adapter harness
_TESTS = Path(__file__).resolve().parent
for _path in (_TESTS, _TESTS / "integration" / "adapters"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
