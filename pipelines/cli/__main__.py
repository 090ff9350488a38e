"""`python -m pipelines.cli ...` runs the `v05` command line (the experiment grid starts its runs so)."""

from pipelines.cli import main

if __name__ == "__main__":
    main()
