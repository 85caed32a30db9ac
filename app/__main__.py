"""``python -m app`` (repository root): same as ``python -m dit_sparse.tools.app`` and ``dit-sparse demo``."""

from dit_sparse.tools.app.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())
