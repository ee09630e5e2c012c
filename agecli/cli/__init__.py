"""The `agecli` command line: parses arguments and calls library functions (`agecli.cli.app`)."""
