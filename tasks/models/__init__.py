"""tasks.models: see ARCHITECTURE.md."""
