"""Prefect tasks over dlm/: bootstrap, convert, evaluate.

Thin wrappers: orchestration only (retries, idempotent re-runs, artifacts). "Already
done?" is the core's one ``is_done(output, key)`` (inputs by digest, config). Long
training tasks checkpoint under ``$FACTORY_HOME/cache/checkpoints/`` so a retried or
re-run task resumes instead of starting over.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from dlm_factory.digest import json_digest
from dlm_factory.dlm.checkpoint.record import StageKey, is_done, model_digest
from dlm_factory.dlm.evaluation.corpus import EvalConfig, evaluate
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig, bootstrap, bootstrap_key
from dlm_factory.dlm.stages.convert import ConvertConfig, convert, convert_key
from dlm_factory.home import factory_home


def checkpoint_dir(key: StageKey) -> Path:
    """Per-stage, per-input, per-config checkpoint dir: a retried or re-run task resumes where it stopped."""
    return factory_home() / "cache" / "checkpoints" / f"{key.stage}-{json_digest(key.model_dump())[7:19]}"


def results_dir(*parts: str) -> Path:
    """Where the factory's reports and plots go: ``$FACTORY_HOME/results/<parts>`` (created)."""
    d = factory_home().joinpath("results", *parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


def reuse(output: str, key: StageKey) -> bool:
    """True (and logged) when ``output`` is already done; else False, logging when a stale model is replaced."""
    if is_done(output, key):
        get_run_logger().info("reusing %s at %s (same inputs and config)", key.stage, output)
        return True
    if Path(output).exists():
        get_run_logger().warning("%s holds a model made from other inputs or config: replacing it "
                                 "(the old one stays until the new one is complete)", output)
    return False


@task(name="bootstrap", retries=1, task_run_name="bootstrap -> {output}")
def bootstrap_task(output: str, config: BootstrapConfig | None = None) -> str:
    """Train the stdlib base model unless ``output`` already holds one made from the same corpus and config."""
    cfg = config or BootstrapConfig()
    key = bootstrap_key(cfg)
    if reuse(output, key):
        return output
    with training_progress(f"bootstrap-{Path(output).name}", cfg.train.steps) as losses:
        result = bootstrap(cfg, output, checkpoint_dir=checkpoint_dir(key), progress=False,
                           overwrite=Path(output).exists())
    loss_curve_artifact(f"bootstrap-{Path(output).name}", losses or result.losses, "bootstrap (AR) training loss")
    get_run_logger().info("bootstrap: final loss %.3f, %.0f tokens/s", result.final_loss, result.tokens_per_s)
    return output


@task(name="convert", retries=1, task_run_name="convert {base_model} -> {output}")
def convert_task(base_model: str, output: str, config: ConvertConfig | None = None) -> str:
    """Convert ``base_model`` into a DLM at ``output`` (reused when already converted from it with this config)."""
    cfg = config or ConvertConfig()
    key = convert_key(base_model, cfg)
    if reuse(output, key):
        return output
    with training_progress(f"convert-{Path(output).name}", cfg.train.steps) as losses:
        result = convert(base_model, output, cfg, checkpoint_dir=checkpoint_dir(key), progress=False,
                         overwrite=Path(output).exists())
    loss_curve_artifact(f"convert-{Path(output).name}", losses or result.losses, "conversion (diffusion) training loss")
    get_run_logger().info("convert: final loss %.3f, %.0f tokens/s", result.final_loss, result.tokens_per_s)
    return output


def _input_digest(value):
    """A local path's content digest (a pulled catalog dir: its manifest digest; a model: its files'); else the value."""
    if not isinstance(value, str) or "://" in value or not Path(value).is_dir():
        return value
    marker = Path(value) / ".catalog-pull.json"
    if marker.is_file():
        return json.loads(marker.read_text())["digest"]
    return model_digest(value)


def digest_cache_key(*paths: str):
    """A Prefect ``cache_key_fn``: the named path parameters by content digest, every other one by value.

    A name may point into a pydantic parameter (``config.judge``). Two runs on the same model
    content and settings share the cached result, wherever the model lives and whatever
    Python objects carried the settings.
    """
    def key(context, parameters: dict) -> str:
        values = {name: value.model_dump(mode="json") if hasattr(value, "model_dump") else value
                  for name, value in parameters.items()}
        for dotted in paths:
            *outer, last = dotted.split(".")
            holder = values
            for part in outer:
                holder = holder.get(part) if isinstance(holder, dict) else None
            if isinstance(holder, dict) and holder.get(last):
                holder[last] = _input_digest(holder[last])
        return f"{context.task.name}-" + json_digest(values)[7:39]

    return key


@task(name="evaluate", task_run_name="evaluate {model}", cache_key_fn=digest_cache_key("model"),
      persist_result=True, result_serializer="json")
def eval_task(model: str, config: EvalConfig | None = None) -> dict:
    """ELBO (diffusion) or exact NLL (AR) in bits/token on the held-out split."""
    return evaluate(model, config or EvalConfig())


def artifact_key(key: str) -> str:
    """``key`` made artifact-key-safe (Prefect: lowercase letters, digits, dashes)."""
    return "-".join(filter(None, "".join(c if c.isalnum() else "-" for c in key.lower()).split("-")))


# Columns a reader does not compare: shown last, after the figures.
PATH_COLUMNS = ("path", "output", "pulled", "model_path", "url", "data_digest", "digest", "error", "detail")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def markdown_table(rows: list[dict]) -> str:
    """A markdown table of ``rows``: the compared figures first, paths, digests and errors last."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cols = [c for c in cols if c not in PATH_COLUMNS] + [c for c in cols if c in PATH_COLUMNS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report_artifact(key: str, rows: list[dict], description: str, samples: list[dict] | None = None) -> None:
    """A markdown table artifact under the flow run: figures first, paths last, then a few generated samples.

    ``samples``: dicts with ``prompt`` and ``text`` (and optionally ``model``), shown below the numbers.
    """
    md = f"**{description}**\n\n" + markdown_table(rows)
    if samples:
        md += "\n**Samples**\n\n" + markdown_table(
            [{k: s.get(k) for k in ("model", "prompt", "text") if k in s} for s in samples[:4]])
    create_markdown_artifact(key=artifact_key(key), markdown=md, description=description)


class _ProgressHandler(logging.Handler):
    """Turns the training loop's ``step ...`` log records of one thread into progress-artifact updates."""

    def __init__(self, artifact_id, total: int):
        super().__init__(logging.INFO)
        self.artifact_id, self.total, self.thread = artifact_id, max(1, total), threading.get_ident()
        self.losses: list[tuple[int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread or not isinstance(record.args, dict) or "step" not in record.args:
            return
        self.losses.append((int(record.args["step"]), float(record.args["loss"])))
        try:
            update_progress_artifact(self.artifact_id, progress=100.0 * self.losses[-1][0] / self.total)
        except Exception:  # noqa: BLE001 - progress is cosmetic: never fail training over it
            pass


@contextmanager
def training_progress(key: str, steps: int) -> Iterator[list[tuple[int, float]]]:
    """A progress artifact that follows the training loop's log records (every ``log_every`` steps).

    Yields the (step, loss) list it collects. The core (dlm/) knows nothing of Prefect: this
    listens to its ``dlm_factory.dlm.train.loop`` logger, in the calling thread only (parallel
    users train in other threads).
    """
    artifact_id = create_progress_artifact(progress=0.0, key=artifact_key(f"progress-{key}"),
                                           description=f"training progress: {key}")
    handler = _ProgressHandler(artifact_id, steps)
    logger = logging.getLogger("dlm_factory.dlm.train.loop")
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.losses
        update_progress_artifact(artifact_id, progress=100.0)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def loss_curve_artifact(key: str, losses: list[tuple[int, float]], title: str) -> str | None:
    """Plot a loss curve to ``$FACTORY_HOME/results/plots/loss-<key>.png``; attach it as image artifact ``loss-<key>``.

    The artifact's URL is the PNG inline (a ``data:`` URL, so the UI shows it with no file
    server); the PNG file stays beside the other results. Returns the file's path.
    """
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"loss-{key}"
    path = results_dir("plots") / f"{artifact_key(key)}.png"
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s for s, _ in losses], [v for _, v in losses], marker=".")
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    image_artifact(key, path, title)
    return str(path)


MAX_INLINE_PNG = 1_000_000  # larger PNGs are linked by file:// URL instead of inlined


def image_artifact(key: str, png: Path, description: str) -> None:
    """An image artifact of ``png``: inline as a ``data:`` URL up to MAX_INLINE_PNG bytes, else its file:// URL."""
    import base64

    data = png.read_bytes()
    url = ("data:image/png;base64," + base64.b64encode(data).decode() if len(data) <= MAX_INLINE_PNG
           else png.resolve().as_uri())
    create_image_artifact(image_url=url, key=artifact_key(key), description=description)
