"""``python -m trainer`` (and ``accelerate launch -m trainer``): see :mod:`trainer.cli`."""

from trainer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
