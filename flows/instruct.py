"""``instruct`` flow: instruction-tune a DLM -> evaluate tuned vs untuned on held-out instructions.

The generations are scored by an instruction-tuned AR judge: unless one is given, the
flow tunes it (AR SFT of the DLM's source AR model on the same data, another seed).
An untuned judge would rank degenerate output (blank lines, repeated ``import``) above
real code; docs/instruct.md shows the measurement.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from dlm_factory.dlm.checkpoint.record import lineage_root
from dlm_factory.dlm.evaluation.instruct import InstructEvalConfig, summary
from dlm_factory.dlm.paths import materialize
from dlm_factory.dlm.stages.instruct import InstructConfig
from dlm_factory.flows.naming import run_name
from dlm_factory.home import factory_home
from dlm_factory.tasks.instruct import instruct_eval_task, instruct_task
from dlm_factory.tasks.models import report_artifact

JUDGE_SEED = 1  # the judge's SFT seed differs from the tuned models' (0): nothing is scored by itself


def judge_config(config: InstructConfig) -> InstructConfig:
    """The judge's AR SFT settings: the DLM's data and budget, objective ar, its own seed."""
    return config.model_copy(update={"objective": "ar",
                                     "train": config.train.model_copy(update={"seed": JUDGE_SEED})})


@flow(name="instruct", log_prints=True, flow_run_name=run_name("instruct", base="model"))
def instruct_flow(model: str | None = None, name: str = "stdlib-dlm-instruct",
                  config: InstructConfig | None = None, eval_config: InstructEvalConfig | None = None,
                  judge: str | None = None) -> dict:
    """LLaDA SFT of a diffusion LM, then the held-out comparison with the model it started from.

    model: the DLM to tune (dir, file:// or s3:// URL); empty = $FACTORY_HOME/models/stdlib-dlm
    (converted first by the ``convert`` flow when missing).
    name: the output lands in $FACTORY_HOME/models/<name>.
    judge: an instruction-tuned AR checkpoint scoring generations (also ``eval_config.judge``);
    empty = tune one from the DLM's source AR model into $FACTORY_HOME/models/<name>-judge.
    """
    models = factory_home() / "models"
    config = config or InstructConfig()
    eval_config = eval_config or InstructEvalConfig()
    if not model:
        model = str(models / "stdlib-dlm")
        if not (Path(model) / "diffusion.json").is_file():
            from dlm_factory.flows.convert import convert_flow

            model = convert_flow()["model"]
    tuned = instruct_task(model, str(models / name), config)
    judge = judge or eval_config.judge
    if not judge:
        source = lineage_root(materialize(model), model)
        judge = instruct_task(source, str(models / f"{name}-judge"), judge_config(config))
    eval_config = eval_config.model_copy(update={"judge": judge})
    # One after the other: each already uses every core, and model loading is not thread-safe.
    tuned_eval = instruct_eval_task(tuned, "tuned", eval_config)
    base_eval = instruct_eval_task(model, "untuned", eval_config)
    rows = [{"model": "untuned DLM", "path": model, **summary(base_eval)},
            {"model": "instruction-tuned DLM", "path": tuned, **summary(tuned_eval)}]
    samples = [{"model": label, "prompt": s.get("source", "")[:160], "text": s.get("text", "")[:200]}
               for label, res in (("untuned", base_eval), ("tuned", tuned_eval))
               for s in (res.get("generation") or {}).get("samples", [])[:2]]
    report_artifact(f"instruct-{name}", rows,
                    f"Held-out instructions: conditional ELBO (bits/token), parse rate, judge NLL (nats/token, "
                    f"judge {judge}), first-line exact match; tuned vs untuned", samples=samples)
    for r in rows:
        print(f"{r['model']:22s} ELBO {r['cond_bits_per_token']} bits/token, parse {r['parse_rate']}, "
              f"judge NLL {r['judge_nll']}, exact first line {r['exact_first_line']}")
    return {"base_model": model, "model": tuned, "judge": judge, "untuned": base_eval, "tuned": tuned_eval}
