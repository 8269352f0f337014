"""tasks.io: the one atomic writer and the workspace lock."""
