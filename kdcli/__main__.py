"""`python -m kdcli` runs the same CLI as the `kdcli` console script."""

from kdcli.cli.app import main

if __name__ == "__main__":
    main()
