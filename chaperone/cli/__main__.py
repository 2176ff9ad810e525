"""``python -m chaperone.cli``: the command line, without the head start."""

from . import main

if __name__ == "__main__":
    main()
