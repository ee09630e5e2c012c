"""`python -m agecli ...`: the same command as the `agecli` script (used by `agecli run --jobs`)."""

from .cli import main

if __name__ == "__main__":
    main()
