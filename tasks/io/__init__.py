"""tasks.io: see ARCHITECTURE.md."""
