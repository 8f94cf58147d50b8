"""``factory generate``: sample text from a diffusion checkpoint (see docs/sampling.md)."""

from __future__ import annotations

import argparse
import json
import sys

from dlm_factory.cli.options import add_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a diffusion LM (LLaDA remasking or Fast-dLLM threshold decoding)",
                       description="Print the text generated after each --prompt. The model must be a diffusion "
                                   "checkpoint (with diffusion.json).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="diffusion checkpoint: dir, file:// or s3:// URL")
    which.add_argument("--ensemble", help="an ensemble dir (ENSEMBLE.json), or a dir of user ensembles "
                                          "(<dir>/<user>/ENSEMBLE.json) to route among")
    p.add_argument("--user", help="with --ensemble: the user whose ensemble answers (default: route each "
                                  "prompt by the users' prefix routers, docs/ensemble.md)")
    p.add_argument("--context", help="with --ensemble: private context text the specialist sees")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--length", type=int, help="response length in tokens (default: 64)")
    p.add_argument("--steps", type=int, help="llada: denoising steps (default: length)")
    p.add_argument("--sampler", choices=["llada", "threshold", "speculative"],
                   help="decoding method (default: threshold); speculative: the DLM drafts, its AR source verifies "
                        "(greedy output = the AR model's greedy output; see docs/sampling.md)")
    p.add_argument("--verifier", help="speculative: the AR verifier (default: the DLM's source AR model)")
    p.add_argument("--draft", type=int, help="speculative: tokens drafted in the first round (default: 4; adapted)")
    p.add_argument("--draft-refresh", type=int, help="speculative: the drafter's prefix KV cache is recomputed every "
                                                     "N rounds (default: 64; 0: no cache, a full forward every round)")
    p.add_argument("--remasking", choices=["low_confidence", "random"],
                   help="llada: commit the most confident positions (default) or random ones (random-order "
                        "ancestral sampling with --temperature 1)")
    p.add_argument("--threshold", type=float, help="threshold sampler: confidence tau (default: 0.9)")
    p.add_argument("--block-size", type=int, help="semi-autoregressive block size (default: 32)")
    p.add_argument("--cache", choices=["none", "prefix", "dual", "block"],
                   help="threshold sampler: KV cache (default: dual); block: exact cache of a block-causal model")
    p.add_argument("--cfg", type=float, help="unsupervised classifier-free guidance weight (default: 0)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, help="top-k sampling (default: 0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: 1.0 = off)")
    p.add_argument("--seed", type=int, help="sampling seed (default: 0)")
    p.add_argument("--no-stop-at-eos", action="store_true", help="decode all tokens and print them raw")
    p.add_argument("--stream", action="store_true", help="print the tokens committed at each step to stderr")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the plain text")
    p.add_argument("--raw", action="store_true",
                   help="feed the prompt as is (default: instruction-tuned models get their chat template)")
    add_device(p)
    p.set_defaults(func=_generate)


def sampler_config(args):
    """SamplerConfig from the parsed flags; invalid values become one FactoryError line."""
    from pydantic import ValidationError

    from dlm_factory.dlm.errors import FactoryError
    from dlm_factory.dlm.sampling.sampler import SamplerConfig

    values = dict(sampler=args.sampler, length=args.length, steps=args.steps, threshold=args.threshold,
                  block_size=args.block_size, cache=args.cache, cfg_weight=args.cfg, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, remasking=args.remasking,
                  stop_at_eos=False if args.no_stop_at_eos else None)
    flags = {"cfg_weight": "--cfg", "block_size": "--block-size", "top_k": "--top-k", "top_p": "--top-p"}
    try:
        return SamplerConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        where = flags.get(str(err["loc"][0]), "--" + str(err["loc"][0])) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise FactoryError(f"{where}: {msg}" if where else msg) from e


def _streamer(tok):
    """``on_step`` callback printing the tokens each denoising step commits (``--stream``), to stderr."""
    def stream(step):
        for b, pairs in enumerate(step.committed):
            if pairs:
                pieces = " ".join(f"{off}:{tok.decode([t])!r}" for off, t in pairs)
                print(f"[step {step.step} block {step.block} row {b}] +{len(pairs)} {pieces}", file=sys.stderr, flush=True)

    return stream


def _generate(args) -> int:
    if args.sampler == "speculative":
        return _speculative(args)
    cfg = sampler_config(args)  # bad flags fail before the model is loaded
    if args.ensemble is not None:
        return _generate_ensemble(args, cfg)
    if args.user is not None or args.context is not None:
        from dlm_factory.dlm.errors import FactoryError

        raise FactoryError("--user and --context apply to --ensemble only")

    import time

    from dlm_factory.dlm.checkpoint.io import load_model
    from dlm_factory.dlm.checkpoint.spec import SPEC_FILE
    from dlm_factory.dlm.errors import FactoryError
    from dlm_factory.dlm.sampling.generate import generate

    loaded = load_model(args.model)
    if loaded.spec is None:
        raise FactoryError(f"{args.model}: no {SPEC_FILE}: this is an autoregressive checkpoint; "
                           "convert it first (factory convert)")
    tok = loaded.tokenizer

    stream = _streamer(tok)

    start = time.perf_counter()
    texts = generate(loaded, args.prompt, cfg, on_step=stream if args.stream else None,
                     chat=False if args.raw else None)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"prompts": args.prompt, "texts": texts, "seconds": round(seconds, 3),
                          "config": cfg.model_dump()}))
    else:
        for text in texts:
            print(text)
    return 0


def _generate_ensemble(args, cfg) -> int:
    import time

    from dlm_factory.dlm.checkpoint.ensemble import generate_routed, load_ensembles

    ensembles = load_ensembles(args.ensemble, user=args.user)  # a user without an ensemble: one error line
    tok = next(iter(ensembles.values())).tokenizer

    stream = _streamer(tok)

    start = time.perf_counter()
    users, texts = generate_routed(ensembles, args.prompt, cfg, context=args.context,
                                   on_step=stream if args.stream else None, chat=False if args.raw else None)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"prompts": args.prompt, "users": users, "texts": texts, "seconds": round(seconds, 3),
                          "routed": args.user is None and len(ensembles) > 1, "config": cfg.model_dump()}))
    else:
        if args.user is None and len(ensembles) > 1:
            for i, u in enumerate(users):
                print(f"routed prompt {i} to user {u}", file=sys.stderr)
        for text in texts:
            print(text)
    return 0


def _speculative(args) -> int:
    import time

    from pydantic import ValidationError

    from dlm_factory.dlm.checkpoint.io import load_model
    from dlm_factory.dlm.checkpoint.record import lineage_root
    from dlm_factory.dlm.errors import FactoryError
    from dlm_factory.dlm.sampling.generate import encode_prompts
    from dlm_factory.dlm.sampling.speculative import SpeculativeConfig, speculative_generate

    values = {"length": args.length, "k": args.draft, "temperature": args.temperature, "seed": args.seed,
              "refresh": args.draft_refresh, "stop_at_eos": False if args.no_stop_at_eos else None}
    try:
        cfg = SpeculativeConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        flag = {"k": "--draft", "refresh": "--draft-refresh", "stop_at_eos": "--no-stop-at-eos"}.get(str(err["loc"][0]), f"--{err['loc'][0]}")
        raise FactoryError(f"{flag}: {err['msg']}") from e
    drafter = load_model(args.model)
    if drafter.spec is None:
        raise FactoryError(f"{args.model}: the drafter must be a diffusion checkpoint (with diffusion.json)")
    verifier_src = args.verifier or (lineage_root(drafter.path, "") if drafter.path else "")
    if not verifier_src:
        raise FactoryError(f"{args.model}: no lineage to an AR model recorded; pass --verifier AR_DIR")
    verifier = load_model(verifier_src)
    prompts = encode_prompts(verifier.tokenizer, args.prompt)  # raw text: the verifier's own convention
    start = time.perf_counter()
    ids, stats = speculative_generate(drafter, verifier, prompts, cfg)
    seconds = time.perf_counter() - start
    texts = [verifier.tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    if args.json:
        print(json.dumps({"prompts": args.prompt, "texts": texts, "seconds": round(seconds, 3), "verifier": verifier_src,
                          "tokens_per_round": round(stats.tokens_per_round, 3), "acceptance": round(stats.acceptance, 3),
                          "config": cfg.model_dump()}))
    else:
        for text in texts:
            print(text)
    return 0
