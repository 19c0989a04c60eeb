"""`python -m megaflow.cli ARGS`: the same as `megaflow ARGS`."""

from megaflow.cli.entry import main

if __name__ == "__main__":
    main()
