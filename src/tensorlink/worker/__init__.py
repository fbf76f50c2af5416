"""Worker side: the stages a contributor's machine has accepted and runs."""
