"""tasks.stages: see ARCHITECTURE.md."""
