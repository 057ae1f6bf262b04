"""``python -m sharnn_fast`` is the ``sharnn`` command."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
