"""tasks.features.extract: see ARCHITECTURE.md."""
