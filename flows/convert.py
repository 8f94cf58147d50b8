"""``convert`` flow: (bootstrap if no base model) -> convert -> evaluate AR and DLM side by side."""

from __future__ import annotations

from prefect import flow

from dlm_factory.dlm.evaluation.corpus import EvalConfig
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig
from dlm_factory.dlm.stages.convert import ConvertConfig
from dlm_factory.flows.naming import run_name
from dlm_factory.home import factory_home
from dlm_factory.tasks.models import bootstrap_task, convert_task, eval_task, report_artifact


@flow(name="convert", log_prints=True, flow_run_name=run_name("convert"))
def convert_flow(base_model: str | None = None, name: str = "stdlib-dlm",
                 convert_config: ConvertConfig | None = None,
                 eval_config: EvalConfig | None = None,
                 bootstrap_config: BootstrapConfig | None = None) -> dict:
    """Turn an AR checkpoint into a masked-diffusion LM and report its ELBO beside the AR NLL.

    base_model: AR checkpoint (dir, file:// or s3:// URL, hub id); empty = bootstrap the stdlib model.
    name: the output lands in $FACTORY_HOME/models/<name>.
    """
    models = factory_home() / "models"
    if not base_model:
        base_model = bootstrap_task(str(models / "stdlib-ar"), bootstrap_config)
    dlm_dir = convert_task(base_model, str(models / name), convert_config)
    # One after the other: each already uses every core, and model loading is not thread-safe.
    ar_eval = eval_task(base_model, eval_config)
    dlm_eval = eval_task(dlm_dir, eval_config)
    rows = [
        {"model": "AR (exact NLL)", "path": base_model, **_figures(ar_eval)},
        {"model": "DLM (ELBO)", "path": dlm_dir, **_figures(dlm_eval)},
    ]
    report_artifact(f"convert-{name}", rows, "Held-out bits/token: AR exact NLL vs converted DLM ELBO")
    for r in rows:
        print(f"{r['model']:16s} {r['bits_per_token']:.3f} bits/token (± {r['stderr']:.3f})")
    return {"base_model": base_model, "model": dlm_dir, "ar": ar_eval, "dlm": dlm_eval}


def _figures(result: dict) -> dict:
    return {"bits_per_token": round(result["bits_per_token"], 4), "stderr": round(result["stderr"], 4),
            "tokens": result["tokens"]}
