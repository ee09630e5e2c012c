from agecli.cli.app import main

main()
