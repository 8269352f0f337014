"""tasks.stages: one ``run_<stage>`` module per dvc.yaml stage, a thin shell around the libraries."""
