"""``instruct`` flow: instruction-tune a DLM -> evaluate tuned vs untuned on held-out instructions."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dlm.instruct import InstructConfig, InstructEvalConfig, summary
from dlm.paths import factory_home
from tasks.instruct import instruct_eval_task, instruct_task
from tasks.models import report_artifact


@flow(name="instruct", log_prints=True)
def instruct_flow(model: str | None = None, name: str = "stdlib-dlm-instruct",
                  config: InstructConfig | None = None, eval_config: InstructEvalConfig | None = None) -> dict:
    """LLaDA SFT of a diffusion LM, then the held-out comparison with the model it started from.

    model: the DLM to tune (dir, file:// or s3:// URL); empty = $FACTORY_HOME/models/stdlib-dlm
    (converted first by the ``convert`` flow when missing).
    name: the output lands in $FACTORY_HOME/models/<name>.
    """
    models = factory_home() / "models"
    if not model:
        model = str(models / "stdlib-dlm")
        if not (Path(model) / "diffusion.json").is_file():
            from flows.convert import convert_flow

            model = convert_flow()["model"]
    tuned = instruct_task(model, str(models / name), config)
    # One after the other: each already uses every core, and model loading is not thread-safe.
    tuned_eval = instruct_eval_task(tuned, "tuned", eval_config)
    base_eval = instruct_eval_task(model, "untuned", eval_config)
    rows = [{"model": "untuned DLM", "path": model, **summary(base_eval)},
            {"model": "instruction-tuned DLM", "path": tuned, **summary(tuned_eval)}]
    report_artifact(f"instruct-{name}", rows,
                    "Held-out instructions: conditional ELBO (bits/token), parse rate, judge NLL (nats/token), "
                    "first-line exact match; tuned vs untuned")
    for r in rows:
        print(f"{r['model']:22s} ELBO {r['cond_bits_per_token']} bits/token, parse {r['parse_rate']}, "
              f"judge NLL {r['judge_nll']}, exact first line {r['exact_first_line']}")
    return {"base_model": model, "model": tuned, "untuned": base_eval, "tuned": tuned_eval}
