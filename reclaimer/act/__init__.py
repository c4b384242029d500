"""Acting on a decision: the executors (dry-run and live) and the verification of what an action released."""
