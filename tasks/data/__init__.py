"""tasks.data: see ARCHITECTURE.md."""
