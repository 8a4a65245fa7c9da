"""``python -m factedit.evaluation.compare RUN_DIR... --out DIR``."""

from . import main

raise SystemExit(main())
