"""tasks.reports: plots, histories, run records, the augmentation preview."""
