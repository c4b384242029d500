"""The pure core: the data passed between stages, configuration, the vocabularies, the join and the policy.

Nothing here does I/O (the import-linter contracts in pyproject.toml hold it to that)."""
