"""tasks.reports.plots: see ARCHITECTURE.md."""
