"""Where every stage reads and writes: the one place that names the project's output paths.

``dvc.yaml`` lists the same paths (it is the architecture diagram); a test keeps the two in step.
All paths are relative to a workspace root (the project folder by default, ``--workdir`` on the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FinetuneWork:
    """The files of a resumable fine-tuning run in ``folder`` (``Layout.finetune_work``): removed when the run
    ends, read back when a killed run is resumed."""

    folder: Path

    @property
    def state_dir(self) -> Path:
        return self.folder / "state"

    @property
    def state_file(self) -> Path:
        """Best val loss, best epoch, patience counter, epochs done, the run's fingerprint."""
        return self.state_dir / "state.json"

    @property
    def best_weights(self) -> Path:
        """The best weights so far (``np.savez`` of ``model.get_weights()``; "epoch 0" is the top-only model)."""
        return self.state_dir / "best.npz"

    @property
    def keras_backup(self) -> Path:
        """Keras ``BackupAndRestore``'s folder (its own file names inside)."""
        return self.folder / "backup"

    @property
    def epoch_log(self) -> Path:
        """Keras ``CSVLogger``'s per-epoch rows."""
        return self.folder / "epochs.csv"


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
    def features_cache_pointer(self) -> Path:
        """Where the cache is, when it lives elsewhere (``features.cache_dir``, or a DVC experiment copy's origin):
        ``features_cache`` (a DVC out) then holds only this file."""
        return self.features_cache / "LOCATION.txt"

    @property
    def features_manifest(self) -> Path:
        """What the features ARE for this index (cache key, views, content hash): changes iff the features do,
        so DVC reruns train_top only then. This run's counts go to :attr:`features_metrics`, its timings to
        ``run_record("features")``."""
        return self.root / "features" / "features.json"

    @property
    def activations_manifest(self) -> Path:
        """What the cut-point activations for tail fine-tuning are (key, cut layer, views), or which other path
        fine-tuning takes: written by the features stage, the DVC dependency of finetune (not of train_top)."""
        return self.root / "features" / "activations.json"

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

    @staticmethod
    def bundle_classes(folder: Path) -> Path:
        """``classes.json`` of a saved model bundle in ``folder`` (beside its ``.keras`` file, or in a SavedModel
        export): the class order and resize rule (``tasks.models.heads.write_classes_file``)."""
        return Path(folder) / "classes.json"

    @property
    def top_head_model(self) -> Path:
        """The best head train_top saved (``.keras``, features in, probabilities out)."""
        return self.top_dir / "head.keras"

    @property
    def top_head_info(self) -> Path:
        """``head.json`` beside the head: its spec, class info, feature dim, base and the model file's sha256."""
        return self.top_dir / "head.json"

    @property
    def finetune_checkpoints(self) -> Path:
        """Keras BackupAndRestore folder: a killed finetune resumes from its last finished epoch."""
        return self.root / "cache" / "finetune_backup"

    @property
    def finetune_work(self) -> FinetuneWork:
        """The files inside :attr:`finetune_checkpoints`."""
        return FinetuneWork(self.finetune_checkpoints)

    @property
    def champion_dir(self) -> Path:
        """A symlink to ``champions/<candidate id>/``: swapped atomically when a candidate is promoted."""
        return self.models_dir / "champion"

    @property
    def champion_link_model(self) -> Path:
        """``champion/model.keras``: the current champion's model, through the :attr:`champion_dir` link."""
        return self.champion_dir / self.candidate_model.name

    @property
    def champions_dir(self) -> Path:
        """Every promoted model, immutable, one folder per candidate id."""
        return self.models_dir / "champions"

    @property
    def model_registry(self) -> Path:
        return self.models_dir / "registry.json"

    def champion_folder(self, candidate_id: str) -> Path:
        """``champions/<id>/``: a promoted candidate's immutable copy of ``candidate_dir``."""
        return self.champions_dir / candidate_id

    def champion_model(self, candidate_id: str) -> Path:
        """``champions/<id>/model.keras``: the model file of a promoted candidate (the registry's model_path)."""
        return self.champion_folder(candidate_id) / self.candidate_model.name

    def champion_record(self, candidate_id: str) -> Path:
        """``champions/<id>/champion.json``: the registry record of the candidate, beside its copy."""
        return self.champion_folder(candidate_id) / "champion.json"

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

    # train_top
    @property
    def top_metrics(self) -> Path:
        """The best head and every head's val figures (a DVC metric)."""
        return self.metrics_dir / "top.json"

    @property
    def top_report(self) -> Path:
        """The heads compared, one Markdown table."""
        return self.reports_dir / "top_comparison.md"

    @property
    def top_history(self) -> Path:
        """Every head's epochs in one table (``head,epoch,...``): read by evaluate's training curves."""
        return self.plots_dir / "top_history.csv"

    @property
    def top_heads_plots(self) -> Path:
        """``plots/top_heads/``: one ``<head>.csv`` per head (DVC's series are per file)."""
        return self.plots_dir / "top_heads"

    def top_head_history(self, head: str) -> Path:
        """``plots/top_heads/<head>.csv``: one head's epochs."""
        return self.top_heads_plots / f"{head}.csv"

    # finetune
    @property
    def finetune_metrics(self) -> Path:
        """The fine-tuning figures and decision (a DVC metric)."""
        return self.metrics_dir / "finetune.json"

    @property
    def finetune_history(self) -> Path:
        """The fine-tuning epochs (``epoch,loss,accuracy,val_loss,val_accuracy``)."""
        return self.plots_dir / "finetune_history.csv"

    # evaluate
    @property
    def evaluate_metrics(self) -> Path:
        """The candidate's test / val figures, the top-only model's and the score (what promotion reads)."""
        return self.metrics_dir / "evaluate.json"

    @property
    def confusion_csv(self) -> Path:
        """``actual,predicted`` per test image (``dvc plots``' confusion template)."""
        return self.plots_dir / "confusion.csv"

    @property
    def evaluation_details(self) -> Path:
        """Every figure of both models per split, per class included."""
        return self.reports_dir / "evaluation.json"

    @property
    def model_comparison(self) -> Path:
        """Top-only vs fine-tuned, and which weights the candidate kept (Markdown)."""
        return self.reports_dir / "model_comparison.md"

    @property
    def training_curves_png(self) -> Path:
        return self.reports_dir / "training_curves.png"

    @property
    def confusion_png(self) -> Path:
        return self.reports_dir / "confusion_matrix.png"

    @property
    def predictions_png(self) -> Path:
        """The class-balanced grid of test predictions."""
        return self.reports_dir / "predictions.png"

    # augment-preview (not a DVC stage)
    def augment_preview(self, policy_hash: str) -> Path:
        """``reports/augment_preview_<policy short hash>.png``."""
        return self.reports_dir / f"augment_preview_{policy_hash}.png"

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
