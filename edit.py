"""Apply a knowledge editor to a model and score the edits. See ``python edit.py --help``.

The same command is installed as ``factedit-edit``; the application is :mod:`factedit.evaluation.cli`.
"""

from factedit.evaluation.cli import main

if __name__ == "__main__":
    main()
