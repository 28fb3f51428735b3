"""Compose: argv and recipes -> a gated, composed config (torch-free): the schema, the gate,
safe reading of received files, the checks that need no torch."""
