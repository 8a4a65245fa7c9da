from factedit import require_namespace

require_namespace(__name__)
