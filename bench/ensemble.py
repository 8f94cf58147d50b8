"""Ensemble benchmark: general DLM + small user specialist (SSD-2) on the demo users, measured side by side.

    .venv/bin/python bench/ensemble.py --small-budget            # full run (builds, then measures)
    .venv/bin/python bench/ensemble.py --small-budget --smoke    # minutes: smaller measurement budgets

The models come from ``bench/user_models.py``, the same ones ``bench/specialize.py``
measures (same flags, same cache): the general AR model and its DLM, trained on the stdlib
*without* the demo users' packages (``GENERAL_TRAIN``); a small AR model >= 10x smaller on
the same tokenizer and its DLM, the specialists' base; per user, the QLoRA specialist of
``dlm.stages.specialize`` (4-bit NF4 base + LoRA, merged and stored 4-bit), as served.
For the AR collaboration, per user an AR specialist: LoRA with the same rank, steps,
learning rate and batch on the small AR model, next-token loss, the same train split.

What it measures, in one run:
1. Per user, ``build_ensemble``: lambda and the form swept on the validation windows
   (even held-out windows), then ELBO of general, specialist and ensemble on the test
   windows (odd), paired draws with Monte Carlo error bars, and the validation gate.
2. AR collaboration: the same combination (token-by-token log-space mixing) of the AR
   general model and the AR specialist, lambda and form tuned on the same validation
   windows, exact NLL on the same test windows. Relative gain of each ensemble over its
   own general member.
3. Overhead: sampling time of the ensemble / the general model alone, same prompts and
   sampler settings (threshold + dual cache, fixed length, no early stop), contenders
   interleaved and the order rotated; and where one cached step's time goes.
4. Router: accuracy of prefix-ELBO routing (M = 32) on held-out requests of the demo users,
   and its cost per request beside the generation time per request.

Prints one JSON line, then the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from user_models import add_arguments, build, say

from dlm_factory.digest import tokenizer_digest
from dlm_factory.dlm import runtime
from dlm_factory.dlm.checkpoint.ensemble import serving
from dlm_factory.dlm.checkpoint.io import Loaded, load_model, save_model
from dlm_factory.dlm.checkpoint.record import StageKey, is_done, model_digest, new_record
from dlm_factory.dlm.data.corpus import (
    Blocks,
    code_prompts,
    encode_documents,
    rolling_windows,
    tokenize_blocks,
)
from dlm_factory.dlm.data.users import (
    DEMO_USERS,
    user_data_digest,
    user_documents,
)
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.diffusion.ensemble import FORM_SHORT, FORMS, EnsembleDenoiser, form_weights
from dlm_factory.dlm.diffusion.objective import ar_loss
from dlm_factory.dlm.evaluation.gate import GateConfig
from dlm_factory.dlm.evaluation.likelihood import ar_combined_nll
from dlm_factory.dlm.evaluation.router import (
    RouterConfig,
    fit_router,
    prefix_requests,
    routing_accuracy,
)
from dlm_factory.dlm.sampling.generate import encode_prompts
from dlm_factory.dlm.sampling.sampler import SamplerConfig, random_order, sample
from dlm_factory.dlm.stages.ensemble import EnsembleConfig, build_ensemble, split_windows
from dlm_factory.dlm.train.loop import train
from dlm_factory.home import factory_home

# --- building the contenders -----------------------------------------------------------------

def ar_specialist(base_ar: Path, docs, out: Path, spec_cfg, data_digest: str) -> Path:
    """The AR counterpart of a QLoRA specialist: LoRA (same rank, alpha, targets) on the small AR model with
    next-token loss, the same steps, learning rate, batch and train split; merged and saved in full precision."""
    from peft import LoraConfig, get_peft_model

    q, tc = spec_cfg.qlora, spec_cfg.train
    key = StageKey(stage="bench-ar-specialist", inputs={"base": model_digest(base_ar), "data": data_digest},
                   config={"qlora": q.model_dump(), "train": tc.model_dump(), "seq_len": spec_cfg.seq_len})
    if is_done(out, key):
        return out
    loaded = load_model(base_ar)
    blocks = Blocks(tokenize_blocks(loaded.tokenizer, docs, spec_cfg.seq_len))
    model = get_peft_model(loaded.model, LoraConfig(r=q.rank, lora_alpha=q.alpha, lora_dropout=q.dropout,
                                                    target_modules=q.target_modules, bias="none"))
    mb = tc.micro_batch()
    res = train(model, lambda step, m: blocks.batch(step * tc.slots() + m, mb, tc.seed),
                lambda mo, b, s, g: ar_loss(mo, b["input_ids"]), tc, progress=False)
    merged = model.merge_and_unload().eval()
    save_model(Loaded(merged, loaded.tokenizer, None), out, overwrite=True,
               record=new_record(key, runtime=runtime.current().describe(), result=res.summary()))
    return out


def n_params(path: Path) -> int:
    m = load_model(path).model
    return sum(p.numel() for p in m.parameters())


# --- measurements ------------------------------------------------------------------------------

def ar_collaboration(general_ar: Path, spec_ar: Path, small_ar_dir: Path, validation, test, lambdas) -> dict:
    """The same combination on the AR checkpoints: tune (form, lambda) on validation, exact NLL on test."""
    models = {"general": load_model(general_ar).model, "specialist": load_model(spec_ar).model,
              "base": load_model(small_ar_dir).model}
    grid = {}
    for form in FORMS:
        for lam in lambdas:
            wg, ws, wb = form_weights(form, lam)
            weights = {"general": wg, "specialist": ws} | ({"base": wb} if wb else {})
            grid[f"{FORM_SHORT[form]}@{lam:g}"] = weights
    val = ar_combined_nll(models, grid, validation.ids, attention_mask=validation.attention_mask, keep=validation.keep)
    best = min(grid, key=lambda k: val[k].bits_per_token)
    est = ar_combined_nll(models, {best: grid[best]}, test.ids, attention_mask=test.attention_mask, keep=test.keep)
    return {"choice": best, "validation": {k: val[k].bits_per_token for k in grid},
            "general": est["general"].to_dict(), "specialist": est["specialist"].to_dict(),
            "ensemble": est[best].to_dict(), "ensemble_minus_general": est[f"{best}-general"].to_dict(),
            "specialist_minus_general": est["specialist-general"].to_dict()}


def overhead(contenders: dict[str, object], prompt_ids, cfg: SamplerConfig, repeats: int) -> dict:
    """Seconds of each contender over ``repeats`` rounds on the same prompts, order rotated every round."""
    names = list(contenders)
    seconds = {n: 0.0 for n in names}
    sample(contenders[names[0]], prompt_ids[:1], cfg.model_copy(update={"length": min(cfg.length, 8)}))  # warm-up
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            start = time.perf_counter()
            sample(contenders[n], prompt_ids, cfg)
            seconds[n] += time.perf_counter() - start
    tokens = repeats * len(prompt_ids) * cfg.length
    return {n: {"seconds": s, "tokens_per_s": tokens / s, "ratio_vs_general": s / seconds[names[0]]}
            for n, s in seconds.items()}


def step_overhead(general: Path, specialist, specialist_dir: Path, base, sizes: list[tuple[int, int, int]], *, batch: int, prompt: int,
                  length: int, reps: int) -> list[dict]:
    """Time of one cached denoising step (a 33-position window over the block KV cache) of the general
    model alone vs the ensembles, for general models of several sizes with the same specialist, and where
    the time goes: the specialist alone (as served, 4-bit; and dequantized to fp32) and the combination.

    The trained general model is the first row; the others are random-weight Llamas of the given
    (hidden, layers, heads) on the same tokenizer and spec: a step's cost does not depend on the
    weights, so this shows how the overhead shrinks as the general model grows (SSD-2: ~100x).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlm_factory.dlm.checkpoint.io import set_bidirectional

    trained = load_model(general)
    rows = [("trained", ModelDenoiser(trained))]
    for h, layers, heads in sizes:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=trained.model.config.vocab_size, hidden_size=h,
                          intermediate_size=int(h * 8 / 3) // 8 * 8, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=heads, max_position_embeddings=512, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).eval()
        set_bidirectional(model)
        rows.append((f"random {h}x{layers}", ModelDenoiser(Loaded(model, trained.tokenizer, trained.spec))))
    x = torch.randint(10, len(trained.tokenizer) - 10, (batch, prompt + length))
    am = torch.ones_like(x)
    block = (prompt, prompt + min(32, length))
    spec_params = sum(p.numel() for p in specialist.model.parameters())
    s32 = ModelDenoiser(serving(load_model(specialist_dir)))  # 4-bit weights dequantized to fp32
    out = []
    for label, g in rows:
        dens = {"general": g, "specialist": specialist, "specialist_fp32": s32,
                "poe": EnsembleDenoiser.combine("poe", 1.0, g, specialist),
                "poe_fp32": EnsembleDenoiser.combine("poe", 1.0, g, s32),
                "eft": EnsembleDenoiser.combine("eft", 1.0, g, specialist, base)}
        caches = {n: d.block_cache(x, am, block)[1] for n, d in dens.items()}
        seconds = {n: 0.0 for n in dens}
        names = list(dens)
        for r in range(reps):  # interleaved, order rotated
            for n in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                for _ in range(5):
                    dens[n].block_log_probs(caches[n], x, am)
                seconds[n] += time.perf_counter() - start
        params = sum(p.numel() for p in g.model.parameters())
        ms = {n: 1000 * v / (5 * reps) for n, v in seconds.items()}
        out.append({"general": label, "params": params, "size_ratio": params / spec_params, "step_ms": ms,
                    "poe_ratio": seconds["poe"] / seconds["general"], "eft_ratio": seconds["eft"] / seconds["general"],
                    "poe_fp32_ratio": seconds["poe_fp32"] / seconds["general"],
                    "combine_ms": ms["poe"] - ms["general"] - ms["specialist"]})
    return out


def router_figures(tokenizer, specialist_dirs: dict[str, Path], root: str, args) -> dict:
    """Routing accuracy on the users' held-out requests, by both rules on the same requests: the n-gram
    routers (counted on each user's train split, as ``build_ensemble`` does) at M/2, M, 2M, and the
    specialists' prefix ELBO at the same M's and at fewer/more draws (estimator noise)."""
    say("router")
    users = list(specialist_dirs)
    longest = 2 * args.prefix_tokens  # one request set for every M: requests long enough for 2M tokens, cut to M
    requests = {u: prefix_requests(tokenizer, user_documents(root, u, "heldout"), args.router_requests, longest)
                for u in users}
    ngram = RouterConfig(prefix_tokens=args.prefix_tokens)
    t0 = time.perf_counter()
    routers = {u: fit_router(encode_documents(tokenizer, user_documents(root, u, "train")), len(tokenizer), ngram)
               for u in users}
    fit_seconds = (time.perf_counter() - t0) / len(users)
    sizes = {u: len(lm.to_bytes()) for u, lm in routers.items()}
    specialists = {u: ModelDenoiser(load_model(d)) for u, d in specialist_dirs.items()}
    elbo = ngram.model_copy(update={"rule": "prefix_elbo"})
    runs = []
    for m in (args.prefix_tokens // 2, args.prefix_tokens, longest):
        runs.append(routing_accuracy(routers, requests, ngram.model_copy(update={"prefix_tokens": m})))
        runs.append(routing_accuracy(specialists, requests, elbo.model_copy(update={"prefix_tokens": m})))
    for r in (8, 128):
        runs.append(routing_accuracy(specialists, requests, elbo.model_copy(update={"mc_samples": r})))
    return {"runs": runs, "router_bytes": sizes, "fit_seconds_per_user": fit_seconds,
            "train_tokens": {u: sum(map(len, encode_documents(tokenizer, user_documents(root, u, "train"))))
                             for u in users}}


def router_table(rt: dict) -> list[str]:
    gen = rt.get("generation_seconds_per_request")
    out = ["", "Router, held-out requests (the same requests cut to M tokens):", "",
           "| rule | M | draws | requests | accuracy | per user | seconds / request | routing / generation time |",
           "|---|---:|---:|---:|---:|---|---:|---:|"]
    for x in sorted(rt["runs"], key=lambda x: (x["rule"], x["prefix_tokens"], x.get("mc_samples", 0))):
        per = ", ".join(f"{u} {v:.2f}" for u, v in x["per_user"].items())
        ratio = f"{x['seconds_per_request'] / gen:.4f}" if gen else "-"
        out.append(f"| {x['rule']} | {x['prefix_tokens']} | {x.get('mc_samples', '-')} | {x['requests']} | "
                   f"{x['accuracy']:.3f} ± {x['stderr']:.3f} | {per} | {x['seconds_per_request']:.5f} | {ratio} |")
    sizes = ", ".join(f"{u} {b / 1e3:.0f} kB ({rt['train_tokens'][u]:,} train tokens)" for u, b in rt["router_bytes"].items())
    out += ["", f"n-gram routers: {sizes}; fitted in {rt['fit_seconds_per_user']:.2f} s per user."]
    return out


def rel(a: float, b: float) -> float:
    return (a - b) / b


def clean(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/sampling.md)")
    ap.add_argument("--smoke", action="store_true", help="small measurement budgets and two users: checks the bench runs")
    ap.add_argument("--max-windows", type=int, default=48, help="held-out windows per user (half validation, half test)")
    ap.add_argument("--mc-samples", type=int, default=16, help="Monte Carlo samples per window for every ELBO")
    ap.add_argument("--lambdas", default="0.125,0.25,0.5,0.75,1,1.5,2,3,4,8", help="lambda grid")
    ap.add_argument("--gate-prompts", type=int, default=16, help="held-out prompts sampled by the gate")
    ap.add_argument("--length", type=int, default=64, help="response length of the gate and overhead samples")
    ap.add_argument("--overhead-repeats", type=int, default=3, help="rounds of the overhead timing")
    ap.add_argument("--router-requests", type=int, default=25, help="held-out routing requests per user")
    ap.add_argument("--prefix-tokens", type=int, default=32, help="router prefix M")
    ap.add_argument("--only-router", action="store_true", help="build (or reuse) the models, measure the router only")
    ap.add_argument("--out", help="write the JSON report here too")
    args = ap.parse_args(argv)
    if args.smoke:
        args.max_windows, args.mc_samples, args.gate_prompts, args.length = 8, 4, 2, 16
        args.overhead_repeats, args.router_requests = 1, 4
        if args.users == ",".join(DEMO_USERS):
            args.users = "json,unittest"
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()
    lambdas = [float(x) for x in args.lambdas.split(",")]

    # Build (cached by stage keys; shared with bench/specialize.py)
    m = build(args, default_work=factory_home() / "bench-users")
    users, root, work = m.users, m.root, m.work
    general_ar, general_dlm, small_ar_dir, small_dlm = m.general_ar, m.general, m.base_ar, m.base
    seq_len = m.spec_config.seq_len
    specs = {}
    for u in users:
        say(f"AR specialist for {u}")
        a = ar_specialist(small_ar_dir, user_documents(root, u, "train"), work / "ar-specialists" / u, m.spec_config,
                          user_data_digest(root, u))
        specs[u] = (m.specialists[u], a)
    build_seconds = time.perf_counter() - t_start
    if args.only_router:
        router = router_figures(load_model(general_dlm).tokenizer, {u: specs[u][0] for u in users}, root, args)
        report = clean({"bench": "ensemble-router", "users": users, "router": router,
                        "load_average": [round(x, 2) for x in os.getloadavg()]})
        print(json.dumps(report))
        print("\n".join(router_table(report["router"])))
        return 0
    sizes = {"general": n_params(general_dlm), "specialist": n_params(small_dlm)}
    assert tokenizer_digest(load_model(general_dlm).tokenizer) == tokenizer_digest(load_model(small_dlm).tokenizer)

    # 1 + 2: per user, the diffusion ensemble (tuned, gated) and the AR collaboration
    t_measure = time.perf_counter()
    sampler = random_order(args.length)  # the gate's own sampler (random-order ancestral, t = 1), at the bench's length
    per_user = {}
    for u in users:
        say(f"ensemble for {u}")
        cfg = EnsembleConfig(user=u, data_root=root, lambdas=lambdas, seq_len=seq_len, max_windows=args.max_windows,
                             mc_samples=args.mc_samples, judge=str(general_ar),
                             router=RouterConfig(prefix_tokens=args.prefix_tokens),
                             gate=GateConfig(prompts=args.gate_prompts, sampler=sampler))
        t0 = time.perf_counter()
        res = build_ensemble(general_dlm, specs[u][0], work / "ensembles" / u, cfg, base=small_dlm, overwrite=True,
                             names={"general": "general-dlm", "specialist": f"spec-{u}", "base": "small-dlm"})
        seconds = time.perf_counter() - t0
        elbo = res.gate["elbo"]
        gname, sname = "general-dlm", f"spec-{u}"
        diff = {"ensemble_minus_general": {"bits_per_token": -elbo[f"{gname}-ensemble"]["bits_per_token"],
                                           "stderr": elbo[f"{gname}-ensemble"]["stderr"]},
                "ensemble_minus_specialist": {"bits_per_token": -elbo[f"{sname}-ensemble"]["bits_per_token"],
                                              "stderr": elbo[f"{sname}-ensemble"]["stderr"]}}
        say(f"AR collaboration for {u}")
        tok = load_model(general_ar).tokenizer
        w = rolling_windows(tok, user_documents(root, u, "heldout"), seq_len, max_windows=args.max_windows)
        validation, test = split_windows(w)
        ar = ar_collaboration(general_ar, specs[u][1], small_ar_dir, validation, test, lambdas)
        per_user[u] = {
            "form": res.form, "lambda": res.lam, "gate_passed": res.passed, "seconds": seconds,
            "general": elbo[gname], "specialist": elbo[sname], "ensemble": elbo["ensemble"], **diff,
            "base": elbo.get("small-dlm"),
            "gate_checks": {c["name"]: c["passed"] for c in res.gate["checks"]},
            "quality": {k: {kk: v[kk] for kk in ("judge_nll", "parse_rate", "blank_rate")}
                        for k, v in res.gate["quality"].items()},
            "sweep": {c["name"]: c["bits_per_token"] for c in res.tuning["candidates"]},
            "test_windows": res.gate["windows"], "ar": ar,
            "relative_gain_dlm": -rel(elbo["ensemble"]["bits_per_token"], elbo[gname]["bits_per_token"]),
            "relative_gain_ar": -rel(ar["ensemble"]["bits_per_token"], ar["general"]["bits_per_token"]),
        }

    # 3: overhead of sampling with the ensemble vs the general model alone
    say("overhead")
    u0 = users[0]
    g = ModelDenoiser(load_model(general_dlm))
    s = ModelDenoiser(serving(load_model(specs[u0][0])))  # as load_ensemble serves it on this device
    b = ModelDenoiser(load_model(small_dlm))
    prompts = code_prompts(user_documents(root, u0, "heldout"), 8, lines=3) or ["def f(x):\n"]
    prompt_ids = encode_prompts(g.tokenizer, prompts)
    lam0 = per_user[u0]["lambda"]
    ocfg = SamplerConfig(length=args.length, block_size=32, stop_at_eos=False)
    form0 = per_user[u0]["form"]
    chosen = f"{FORM_SHORT[form0]}@{lam0:g} (chosen)"
    # the user's tuned ensemble, and the product and EFT at lambda 1 (a sharper product, e.g. lambda 3, lets
    # the threshold sampler commit more tokens per step: faster than the general model, not a cost figure)
    contenders = {"general": g, chosen: EnsembleDenoiser.combine(form0, lam0, g, s, b),
                  "poe@1": EnsembleDenoiser.combine("poe", 1.0, g, s),
                  "eft@1": EnsembleDenoiser.combine("eft", 1.0, g, s, b)}
    over = overhead(contenders, prompt_ids, ocfg, args.overhead_repeats)
    say("overhead per step vs general size")
    s4 = ModelDenoiser(load_model(specs[u0][0]))  # the 4-bit kernels, for the per-step breakdown
    steps = step_overhead(general_dlm, s4, specs[u0][0], b, [] if args.smoke else [(384, 8, 6), (512, 12, 8)],
                          batch=len(prompt_ids), prompt=40, length=args.length, reps=3 if args.smoke else 8)
    over_llada = overhead({"general": g, chosen: contenders[chosen]}, prompt_ids,
                          SamplerConfig(sampler="llada", length=args.length, block_size=32, stop_at_eos=False),
                          max(1, args.overhead_repeats - 1))

    # 4: routing accuracy on held-out requests, and its cost
    router = router_figures(g.tokenizer, {u: specs[u][0] for u in users}, root, args)
    gen_per_request = over[chosen]["seconds"] / (args.overhead_repeats * len(prompt_ids))
    router["generation_seconds_per_request"] = gen_per_request
    measure_seconds = time.perf_counter() - t_measure

    report = clean({
        "bench": "ensemble", "users": users, "threads": args.threads, "smoke": args.smoke,
        "params": sizes, "size_ratio": sizes["general"] / sizes["specialist"],
        "settings": {k: v for k, v in vars(args).items() if k not in {"out"}},
        "per_user": per_user,
        "overhead": {"threshold_dual": over, "llada": over_llada, "per_step": steps, "user": u0,
                     "prompts": len(prompt_ids),
                     "length": args.length, "lambda": lam0, "form": form0},
        "router": router,
        "seconds": {"build": build_seconds, "measure": measure_seconds, "total": time.perf_counter() - t_start,
                    "built_now": m.seconds},
        "specialize_config": m.spec_config.model_dump(), "load_average": [round(x, 2) for x in os.getloadavg()],
    })
    line = json.dumps(report)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    def pm(e, key="bits_per_token"):
        return f"{e[key]:.3f} ± {e['stderr']:.3f}"

    out = [f"Sizes: general {r['params']['general']:,} parameters, specialist {r['params']['specialist']:,} "
           f"({r['size_ratio']:.1f}x smaller). Wall time: build {r['seconds']['build']:.0f} s, "
           f"measure {r['seconds']['measure']:.0f} s.", "",
           "ELBO on each user's test windows (bits/token, Monte Carlo stderr; differences paired on shared draws):", "",
           "| user | general | specialist | ensemble (form, λ) | ens − general | ens − specialist | gate |",
           "|---|---:|---:|---|---:|---:|---|"]
    for u, p in r["per_user"].items():
        form = FORM_SHORT[p["form"]]
        out.append(f"| {u} | {pm(p['general'])} | {pm(p['specialist'])} | {pm(p['ensemble'])} ({form}, {p['lambda']:g}) | "
                   f"{pm(p['ensemble_minus_general'])} | {pm(p['ensemble_minus_specialist'])} | "
                   f"{'pass' if p['gate_passed'] else 'FAIL: ' + ', '.join(k for k, v in p['gate_checks'].items() if not v)} |")
    out += ["", "Diffusion vs AR collaboration (same users, windows, data and budget; AR: exact NLL, stderr across windows):", "",
            "| user | DLM general → ensemble | DLM gain | AR general → ensemble (choice) | AR specialist | AR gain |",
            "|---|---|---:|---|---:|---:|"]
    for u, p in r["per_user"].items():
        a = p["ar"]
        out.append(f"| {u} | {p['general']['bits_per_token']:.3f} → {p['ensemble']['bits_per_token']:.3f} | "
                   f"{100 * p['relative_gain_dlm']:.1f}% | {a['general']['bits_per_token']:.3f} → "
                   f"{a['ensemble']['bits_per_token']:.3f} ({a['choice']}) | {a['specialist']['bits_per_token']:.3f} | "
                   f"{100 * p['relative_gain_ar']:.1f}% |")
    o = r["overhead"]
    out += ["", f"Sampling overhead (user {o['user']}, {o['prompts']} prompts x {o['length']} tokens, chosen {o['form']} at λ = {o['lambda']:g}):", "",
            "| sampler | contender | seconds | tokens/s | time vs general |", "|---|---|---:|---:|---:|"]
    for sampler, rows in (("threshold, dual cache", o["threshold_dual"]), ("llada (steps = length)", o["llada"])):
        for name, v in rows.items():
            out.append(f"| {sampler} | {name} | {v['seconds']:.1f} | {v['tokens_per_s']:.1f} | {v['ratio_vs_general']:.3f}x |")
    out += ["", "One cached denoising step (33-position window, same batch), general alone vs ensemble, by general size:", "",
            "| general | parameters | size ratio | general ms | specialist ms (4-bit / fp32) | PoE ms | combine ms | "
            "EFT ms | PoE / general | PoE fp32 / general | EFT / general |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in o["per_step"]:
        ms = x["step_ms"]
        out.append(f"| {x['general']} | {x['params']:,} | {x['size_ratio']:.0f}x | {ms['general']:.2f} | "
                   f"{ms['specialist']:.2f} / {ms['specialist_fp32']:.2f} | {ms['poe']:.2f} | {x['combine_ms']:.2f} | "
                   f"{ms['eft']:.2f} | {x['poe_ratio']:.3f}x | {x['poe_fp32_ratio']:.3f}x | {x['eft_ratio']:.3f}x |")
    out += router_table(r["router"])
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
