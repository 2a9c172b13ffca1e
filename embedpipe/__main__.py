"""``python -m embedpipe``: the same command line as the ``embedpipe`` script."""

from .cli import main

if __name__ == "__main__":
    main()
