"""``factory ensemble build | eval | route | show``: a user's general + specialist ensemble (docs/ensemble.md)."""

from __future__ import annotations

import argparse
import json
import sys

from dlm_factory.cli.options import add_device, validated


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensemble", help="build, evaluate and route ensembles of a general DLM and user specialists",
                       description="SSD-2 ensembles: a large general DLM and a small user specialist combined in "
                                   "log space at every denoising step (see docs/ensemble.md).")
    esub = p.add_subparsers(dest="ensemble_command", required=True, metavar="SUBCOMMAND")

    b = esub.add_parser("build", help="tune lambda on the user's validation windows, run the gate, write the ensemble dir",
                        description="Exit code 0 when the gate passes, 1 when it fails (the dir and its report "
                                    "are written either way; a failed gate is never published), 2 on bad input.")
    b.add_argument("--general", required=True, help="the general diffusion LM (dir)")
    b.add_argument("--specialist", required=True, help="the user's specialist diffusion LM (dir), same tokenizer")
    b.add_argument("--base", help="the specialist's base model (enables the emulated fine-tuning form)")
    b.add_argument("--user", required=True, help="user id: held-out data from <data-root>/users/<id>/data/")
    b.add_argument("--data-root", help="root holding users/<id>/data/ (default: $FACTORY_HOME)")
    b.add_argument("--output", required=True, help="ensemble dir to write (must not exist unless --overwrite)")
    b.add_argument("--form", help="fix the form: product_of_experts (poe), emulated_finetuning (eft) or logarithmic_pool (pool); default: sweep")
    b.add_argument("--lambda", dest="lam", type=float, help="fix lambda (0..8); default: sweep")
    b.add_argument("--lambdas", type=_floats, help="lambda grid of the sweep (default: 0.125,0.25,0.5,0.75,1,1.5,2,3,4,8)")
    b.add_argument("--context", help="private context text the specialist sees before every sequence")
    b.add_argument("--judge", help="AR checkpoint judging samples (default: the general model's AR root)")
    b.add_argument("--name", action="append", default=[], metavar="ROLE=NAME",
                   help="catalog name of a local member (general=..., specialist=..., base=...)")
    b.add_argument("--seq-len", type=int, help="window length (default: 128)")
    b.add_argument("--max-windows", type=int, help="held-out windows, half validation, half test (default: 64)")
    b.add_argument("--mc-samples", type=int, help="Monte Carlo samples per window (default: 32)")
    b.add_argument("--seed", type=int, help="seed of the draws (default: 0)")
    b.add_argument("--margin", type=float, help="gate: bits/token the ensemble must beat each member by (default: 0)")
    b.add_argument("--z", type=float, help="gate: standard errors beyond the margin (default: 2)")
    b.add_argument("--gate-prompts", type=int, help="gate: held-out prompts sampled (default: 16; 0 skips the sample checks)")
    b.add_argument("--prefix-tokens", type=int, help="router: prefix tokens M stored with the ensemble (default: 32)")
    b.add_argument("--no-gate", action="store_true", help="skip the gate (the dir is then not publishable)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    add_device(b)
    b.set_defaults(func=_build)

    e = esub.add_parser("eval", help="ELBO of the ensemble and of each member alone on a user's held-out data (one JSON line)")
    e.add_argument("ensemble", help="ensemble dir")
    e.add_argument("--user", help="user whose held-out data is scored (default: the ensemble's user)")
    e.add_argument("--data-root", help="root holding users/<id>/data/ (default: $FACTORY_HOME)")
    e.add_argument("--seq-len", type=int, default=128, help="window length (default: 128)")
    e.add_argument("--max-windows", type=int, default=64, help="windows scored (default: 64)")
    e.add_argument("--mc-samples", type=int, default=64, help="Monte Carlo samples per window (default: 64)")
    e.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    e.add_argument("--context", help="private context text the specialist sees")
    add_device(e)
    e.set_defaults(func=_eval)

    r = esub.add_parser("route", help="print the user each prompt is routed to (lowest prefix score under the users' routers; docs/ensemble.md)")
    r.add_argument("--ensemble", required=True, help="dir of user ensembles (<dir>/<user>/ENSEMBLE.json)")
    r.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for several)")
    r.add_argument("--prefix-tokens", type=int, help="M (default: the ensembles' router setting, else 32)")
    r.add_argument("--json", action="store_true", help="one JSON line with the scores")
    add_device(r)
    r.set_defaults(func=_route)

    s = esub.add_parser("show", help="members, combination, router and the gate's verdict of an ensemble dir")
    s.add_argument("ensemble", help="ensemble dir")
    s.set_defaults(func=_show)


def _names(pairs: list[str]) -> dict[str, str]:
    from dlm_factory.dlm.errors import FactoryError

    out = {}
    for pair in pairs:
        role, sep, name = pair.partition("=")
        if not sep or role not in {"general", "specialist", "base"} or not name:
            raise FactoryError(f"--name {pair!r}: expected general=NAME, specialist=NAME or base=NAME")
        out[role] = name
    return out


def _build(args) -> int:
    from dlm_factory.dlm.evaluation.gate import GateConfig
    from dlm_factory.dlm.evaluation.router import RouterConfig
    from dlm_factory.dlm.stages.ensemble import EnsembleConfig, build_ensemble

    def make():
        gate = GateConfig(**{k: v for k, v in dict(margin=args.margin, z=args.z, prompts=args.gate_prompts).items()
                             if v is not None})
        router = RouterConfig(**({"prefix_tokens": args.prefix_tokens} if args.prefix_tokens is not None else {}))
        values = dict(user=args.user, data_root=args.data_root, lambdas=args.lambdas, seq_len=args.seq_len,
                      max_windows=args.max_windows, mc_samples=args.mc_samples, seed=args.seed, context=args.context,
                      judge=args.judge)
        return EnsembleConfig(gate=gate, router=router, **{k: v for k, v in values.items() if v is not None})

    cfg = validated(make)
    names = _names(args.name)
    result = build_ensemble(args.general, args.specialist, args.output, cfg, base=args.base, names=names,
                            form=args.form, lam=args.lam, gate=not args.no_gate, overwrite=args.overwrite)
    print(json.dumps(result.summary()))
    if not args.no_gate and not result.passed:
        failed = [c["name"] for c in result.gate.get("checks", []) if not c["passed"]]
        print(f"gate failed ({', '.join(failed)}): not publishable; see {result.output}/gate.md", file=sys.stderr)
        return 1
    return 0


def _eval(args) -> int:
    from dlm_factory.dlm.checkpoint.ensemble import load_ensemble
    from dlm_factory.dlm.data.corpus import rolling_windows
    from dlm_factory.dlm.data.users import user_documents
    from dlm_factory.dlm.errors import FactoryError
    from dlm_factory.dlm.evaluation.likelihood import paired_elbo
    from dlm_factory.home import factory_home

    if args.mc_samples < 2:
        raise FactoryError(f"--mc-samples {args.mc_samples}: the ELBO needs at least 2")
    ens = load_ensemble(args.ensemble)
    user = args.user or ens.user
    if user is None:
        raise FactoryError(f"{args.ensemble}: the ensemble's user is not recorded; pass --user")
    docs = user_documents(args.data_root or str(factory_home()), user, "heldout")
    den = ens.denoiser(args.context)
    w = rolling_windows(ens.tokenizer, docs, args.seq_len, max_windows=args.max_windows, max_positions=den.max_positions)
    members = {m.name or "general": m.denoiser for m in den.members}
    est = paired_elbo({"ensemble": den, **members}, w.ids, attention_mask=w.attention_mask, keep=w.keep,
                      n=args.mc_samples, seed=args.seed)
    print(json.dumps({"ensemble": args.ensemble, "user": user, "form": ens.form, "lambda": ens.lam,
                      "windows": int(w.ids.shape[0]), **{k: v.to_dict() for k, v in est.items()}}))
    return 0


def _route(args) -> int:
    from dlm_factory.dlm.checkpoint.ensemble import load_ensembles, routers
    from dlm_factory.dlm.evaluation.router import prefix_scores
    from dlm_factory.dlm.sampling.generate import encode_prompts

    ensembles = load_ensembles(args.ensemble)
    first = next(iter(ensembles.values()))
    overrides = {} if args.prefix_tokens is None else {"prefix_tokens": args.prefix_tokens}
    cfg, scorers = validated(lambda: routers(ensembles, **overrides))
    users = list(ensembles)
    scores = prefix_scores(scorers, encode_prompts(first.tokenizer, args.prompt), cfg)
    picked = [users[i] for i in scores.argmin(-1).tolist()]
    if args.json:
        print(json.dumps({"users": picked, "scores": [dict(zip(users, row, strict=True)) for row in scores.tolist()],
                          "rule": cfg.rule, "prefix_tokens": cfg.prefix_tokens}))
    else:
        for user in picked:
            print(user)
    return 0


def _show(args) -> int:
    from dlm_factory.dlm.checkpoint.ensemble import ensemble_user, read_spec, roles
    from dlm_factory.dlm.evaluation.gate import read_report

    spec = read_spec(args.ensemble)
    r = roles(spec)
    report = read_report(args.ensemble)
    verdict = "no gate report" if report is None else ("passed" if report.get("passed") else "FAILED")
    print(f"user: {ensemble_user(args.ensemble) or '-'}")
    print(f"form: {r.form}  lambda: {r.lam:g}  gate: {verdict}")
    for m in spec.members:
        part = "base" if r.base is not None and m.name == r.base.name else m.role
        print(f"  {part:10s} {m.name}:{m.version}  {m.digest}")
    if spec.router:
        print(f"router: {json.dumps(spec.router, sort_keys=True)}")
    return 0
