"""Where every stage reads and writes: the one place that names the project's output paths.

``dvc.yaml`` lists the same paths (it is the architecture diagram); a test keeps the two in step.
All paths are relative to a workspace root (the project folder by default, ``--workdir`` on the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    # ---- the raw data (tracked by DVC, not written by any stage)
    @property
    def data_dvc(self) -> Path:
        """The ``.dvc`` file that tracks the raw data folder (``data/``): its md5 is the data version."""
        return self.root / "data.dvc"

    # ---- index stage
    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def index_table(self) -> Path:
        return self.index_dir / "index.csv"

    @property
    def classes_file(self) -> Path:
        return self.index_dir / "classes.json"

    @property
    def index_report(self) -> Path:
        return self.index_dir / "index_report.json"

    # ---- features stage (the cache persists across runs; DVC must not delete it)
    @property
    def features_cache(self) -> Path:
        return self.root / "cache" / "features"

    @property
    def features_manifest(self) -> Path:
        """What the features ARE for this index (cache key, views, content hash): changes iff the features do,
        so DVC reruns train_top only then. This run's counts go to :attr:`features_metrics`, its timings to
        ``run_record("features")``."""
        return self.root / "features" / "features.json"

    @property
    def features_metrics(self) -> Path:
        """The last features run's counts: pairs, computed, reused, images computed (a DVC metric, not a dependency);
        its timings and cache details are in ``run_record("features")``."""
        return self.metrics_dir / "features.json"

    # ---- train_top / finetune
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def top_dir(self) -> Path:
        return self.models_dir / "top"

    @property
    def candidate_dir(self) -> Path:
        """The model this run produced: ``model.keras`` + ``classes.json`` beside it."""
        return self.models_dir / "candidate"

    @property
    def candidate_model(self) -> Path:
        return self.candidate_dir / "model.keras"

    @property
    def finetune_checkpoints(self) -> Path:
        """Keras BackupAndRestore folder: a killed finetune resumes from its last finished epoch."""
        return self.root / "cache" / "finetune_backup"

    @property
    def champion_dir(self) -> Path:
        """A symlink to ``champions/<candidate id>/``: swapped atomically when a candidate is promoted."""
        return self.models_dir / "champion"

    @property
    def champions_dir(self) -> Path:
        """Every promoted model, immutable, one folder per candidate id."""
        return self.models_dir / "champions"

    @property
    def model_registry(self) -> Path:
        return self.models_dir / "registry.json"

    # ---- reports
    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def runs_dir(self) -> Path:
        """Per-run records (timings, throughput, cache details): kept out of ``metrics/`` so that
        ``dvc metrics show`` and ``dvc exp show`` list only the figures that judge a model."""
        return self.reports_dir / "runs"

    def run_record(self, stage: str) -> Path:
        """``reports/runs/<stage>.json``: what the last run of ``stage`` took (seconds, images/s, cache details)."""
        return self.runs_dir / f"{stage}.json"

    @property
    def prefect_server_log(self) -> Path:
        """The log of a Prefect server ``retrainflow run --with-server`` started for its run."""
        return self.root / "cache" / "prefect-server.log"

    @property
    def lock_file(self) -> Path:
        return self.root / ".retrainflow.lock"
