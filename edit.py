"""Apply a knowledge editor to a model and score the edits. See ``python edit.py --help``."""

from evaluation.cli import main

if __name__ == "__main__":
    main()
