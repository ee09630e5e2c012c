"""`python -m agecli ...`: the same command as the `agecli` script (used by `agecli run --jobs`)."""

from agecli.cli.app import main

if __name__ == "__main__":
    main()
