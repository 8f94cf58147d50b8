"""Ensemble dirs: ``ENSEMBLE.json`` (the catalog's spec) plus verified members, loaded with one call.

An ensemble dir holds the catalog's ``ENSEMBLE.json`` (members pinned by name, version
and digest; the combination: form, lambda, weights; the router), the lambda sweep
(``tuning.json``), the validation gate's report (``gate.json``, ``gate.md``) and
``eval_results.json``. Members are found, in this order:

1. ``<dir>/members/<name>/``: where ``factory catalog pull`` puts them (each with its own
   ``MANIFEST.json``);
2. ``<dir>/.ensemble-local.json``: the local paths a build recorded (a dot-file: never
   published).

Every member is verified before it is loaded: a member with a ``MANIFEST.json`` must
carry the pinned name, version and digest (the manifest's own integrity checked) and
every file it lists must match its size and sha256; a local member's weights, config and
tokenizer must hash to the pinned digest (``model_digest``; version = its first 12 hex
digits). A missing or unverifiable member is one FactoryError line.

The combination stored in ENSEMBLE.json::

    {"rule": "emulated_finetuning", "weights": {"dlm-base": 1.0, "spec-alice": 0.5, "dlm-small": -0.5},
     "lambda": 0.5, "base": "dlm-small"}

``weights`` is the log-space sum itself (general 1, specialist lambda, the specialist's
base -lambda for EFT); ``base`` names the specialist's base model (role ``general`` in the
catalog, as it is a general small model).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from dlm_factory.catalog.errors import CatalogError
from dlm_factory.catalog.schema import (
    ENSEMBLE_FILE,
    MANIFEST_FILE,
    Combination,
    EnsembleMember,
    EnsembleSpec,
    parse_ensemble,
    parse_manifest,
)
from dlm_factory.digest import sha256_file
from dlm_factory.dlm.checkpoint.io import Loaded, load_model
from dlm_factory.dlm.checkpoint.record import model_digest
from dlm_factory.dlm.data.users import check_user_id
from dlm_factory.dlm.diffusion.ensemble import (
    EMULATED_FINETUNING,
    EnsembleDenoiser,
    check_form,
    check_lambda,
    form_weights,
)
from dlm_factory.dlm.errors import FactoryError

LOCAL_FILE = ".ensemble-local.json"  # a local build's member paths and user (not published)
MEMBERS_DIR = "members"
_NAME_CHARS = re.compile(r"[^a-z0-9._-]+")


def member_name(path: str | os.PathLike) -> str:
    """A catalog-valid name from a dir name (lowercase, other characters -> '-')."""
    name = _NAME_CHARS.sub("-", Path(path).resolve().name.lower()).strip("-._") or "model"
    return name[:64] if name[0].isalnum() else ("m" + name)[:64]


def pin_member(path: str | os.PathLike, role: str, name: str | None = None) -> EnsembleMember:
    """Pin the model dir ``path``: a catalog model (with MANIFEST.json) by its manifest, else by its
    local content digest (weights, config, tokenizer)."""
    p = Path(path)
    manifest = p / MANIFEST_FILE
    try:
        if manifest.is_file():
            m = parse_manifest(manifest.read_bytes(), str(manifest))
            if name is not None and name != m.name:
                raise FactoryError(f"{p}: a catalog model named {m.name!r}, not {name!r}")
            return EnsembleMember(name=m.name, version=m.version, digest=m.digest, role=role)
        digest = model_digest(p)
        return EnsembleMember(name=name or member_name(p), version=digest[7:19], digest=digest, role=role)
    except CatalogError as e:
        raise FactoryError(str(e)) from None
    except ValueError:  # pydantic: a name that is not a catalog name
        raise FactoryError(f"{p}: invalid member name {name!r}: expected ^[a-z0-9][a-z0-9._-]{{0,63}}$") from None


def ensemble_spec(general: EnsembleMember, specialist: EnsembleMember, form: str, lam: float, *,
                  base: EnsembleMember | None = None, router: dict | None = None) -> EnsembleSpec:
    """ENSEMBLE.json for ``form`` at ``lam`` (the weights are the log-space sum)."""
    form, lam = check_form(form), check_lambda(lam)
    wg, ws, wb = form_weights(form, lam)
    weights = {general.name: wg, specialist.name: ws}
    members = [general, specialist]
    extra: dict = {"lambda": lam}
    if form == EMULATED_FINETUNING:
        if base is None:
            raise FactoryError("the emulated fine-tuning form needs the specialist's base model")
        weights[base.name] = wb
        members.append(base)
        extra["base"] = base.name
    try:
        return EnsembleSpec(members=tuple(members), combination=Combination(rule=form, weights=weights, **extra),
                            router=router)
    except ValueError as e:
        raise FactoryError(f"invalid ensemble: {e}") from None


def repin(directory: str | os.PathLike, pinned: dict[str, EnsembleMember]) -> EnsembleSpec:
    """Rewrite ENSEMBLE.json with members pinned to their catalog versions (after publishing them).

    ``pinned`` maps each current member name to its catalog pin (e.g. from
    ``Catalog.ensemble_spec``); names may change, the combination follows them.
    """
    d = Path(directory)
    spec = read_spec(d)
    missing = [m.name for m in spec.members if m.name not in pinned]
    if missing:
        raise FactoryError(f"repin: no catalog pin for member(s) {', '.join(missing)}")
    rename = {m.name: pinned[m.name].name for m in spec.members}
    members = tuple(EnsembleMember(**{**pinned[m.name].model_dump(), "role": m.role}) for m in spec.members)
    comb = spec.combination.model_dump()
    comb["weights"] = {rename[k]: v for k, v in comb["weights"].items()}
    if "base" in comb:
        comb["base"] = rename[comb["base"]]
    new = EnsembleSpec(members=members, combination=Combination(**comb), router=spec.router)
    new.write(d)
    return new


def read_spec(directory: str | os.PathLike) -> EnsembleSpec:
    path = Path(directory) / ENSEMBLE_FILE
    if not path.is_file():
        raise FactoryError(f"{directory}: not an ensemble dir (no {ENSEMBLE_FILE})")
    try:
        return parse_ensemble(path.read_bytes(), str(path))
    except CatalogError as e:
        raise FactoryError(str(e)) from None


@dataclass
class Roles:
    """Which pinned member plays which part, and the combination's form and lambda."""

    general: EnsembleMember
    specialist: EnsembleMember
    base: EnsembleMember | None
    form: str
    lam: float


def roles(spec: EnsembleSpec, where: str = "ENSEMBLE.json") -> Roles:
    """Read the form, lambda and members' parts from a spec; inconsistent weights are refused."""
    comb = spec.combination
    extra = comb.model_extra or {}
    try:
        form = check_form(comb.rule)
    except FactoryError as e:
        raise FactoryError(f"{where}: {e}") from None
    base_name = extra.get("base")
    specialists = [m for m in spec.members if m.role == "specialist"]
    generals = [m for m in spec.members if m.role == "general" and m.name != base_name]
    base = next((m for m in spec.members if m.name == base_name), None) if base_name is not None else None
    if len(specialists) != 1 or len(generals) != 1:
        raise FactoryError(f"{where}: an ensemble needs one general and one specialist member "
                           f"(found {len(generals)} and {len(specialists)})")
    general, specialist = generals[0], specialists[0]
    lam = extra.get("lambda", comb.weights.get(specialist.name))
    if lam is None:
        raise FactoryError(f"{where}: no lambda (combination.lambda or a weight for {specialist.name})")
    try:
        lam = check_lambda(lam)
    except FactoryError as e:
        raise FactoryError(f"{where}: {e}") from None
    if form == EMULATED_FINETUNING and base is None:
        raise FactoryError(f"{where}: the emulated fine-tuning form needs combination.base (the specialist's base)")
    wg, ws, wb = form_weights(form, lam)
    expected = {general.name: wg, specialist.name: ws} | ({base.name: wb} if form == EMULATED_FINETUNING else {})
    stated = dict(comb.weights)
    stated.setdefault(general.name, 1.0)
    if any(abs(stated.get(k, 0.0) - v) > 1e-9 for k, v in expected.items()) or set(stated) - set(expected):
        raise FactoryError(f"{where}: weights {stated} do not match {form} at lambda {lam:g} ({expected})")
    return Roles(general, specialist, base if form == EMULATED_FINETUNING else None, form, lam)


def verify_member(path: Path, member: EnsembleMember) -> None:
    """Refuse a member dir whose content is not the pinned one (see the module docstring)."""
    manifest = path / MANIFEST_FILE
    if manifest.is_file():
        try:
            m = parse_manifest(manifest.read_bytes(), str(manifest))
        except CatalogError as e:
            raise FactoryError(f"member {member.name}: unverifiable ({e})") from None
        if (m.name, m.version, m.digest) != (member.name, member.version, member.digest):
            raise FactoryError(f"member {member.name}: {path} holds {m.name}:{m.version} ({m.digest[:19]}...), "
                               f"ENSEMBLE.json pins {member.name}:{member.version} ({member.digest[:19]}...)")
        for entry in m.files:
            f = path / entry.path
            if not f.is_file():
                raise FactoryError(f"member {member.name}: {entry.path} is missing")
            size, sha = sha256_file(f)
            if size != entry.size or sha != entry.sha256:
                raise FactoryError(f"member {member.name}: {entry.path} does not match its manifest (sha256)")
        return
    digest = model_digest(path)
    if digest != member.digest:
        raise FactoryError(f"member {member.name}: {path} has digest {digest[:19]}..., ENSEMBLE.json pins "
                           f"{member.digest[:19]}... (unverifiable: a different or modified model)")


def _local(directory: Path) -> dict:
    p = directory / LOCAL_FILE
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise FactoryError(f"{p}: unreadable ({e})") from None
    return data if isinstance(data, dict) else {}


def member_dir(directory: Path, member: EnsembleMember, overrides: dict | None = None) -> Path:
    """Where ``member`` of the ensemble in ``directory`` is (see the module docstring)."""
    if overrides and member.name in overrides:
        path = Path(overrides[member.name])
    elif (directory / MEMBERS_DIR / member.name).is_dir():
        path = directory / MEMBERS_DIR / member.name
    else:
        recorded = (_local(directory).get("members") or {}).get(member.name)
        if recorded is None:
            raise FactoryError(f"member {member.name}: not found (no {directory / MEMBERS_DIR / member.name}, "
                               f"and no local path in {LOCAL_FILE}); pull the ensemble with its members")
        path = Path(recorded)
    if not (path / "config.json").is_file():
        raise FactoryError(f"member {member.name}: {path} is missing or not a model dir")
    return path


def ensemble_user(directory: str | os.PathLike) -> str | None:
    """The user an ensemble dir belongs to: its catalog manifest's, else the local build's, else None."""
    d = Path(directory)
    manifest = d / MANIFEST_FILE
    if manifest.is_file():
        try:
            return parse_manifest(manifest.read_bytes(), str(manifest)).user
        except CatalogError as e:
            raise FactoryError(str(e)) from None
    return _local(d).get("user")


def serving(loaded: Loaded) -> Loaded:
    """``loaded`` as the runtime serves it: a 4-bit model dequantized to fp32 where
    ``runtime.serve_4bit_dequantized`` (CPU); otherwise unchanged. The values are the ones
    the 4-bit kernels dequantize to, so the log-probs agree to float rounding. The model is
    dequantized in place: ``loaded`` is not to be used as 4-bit afterwards."""
    from dlm_factory.dlm import runtime

    if getattr(loaded.model, "hf_quantizer", None) is None or not runtime.current().serve_4bit_dequantized:
        return loaded
    from dlm_factory.dlm.train.qlora import keep_trainable_layout

    keep_trainable_layout(loaded.model)  # undo bitsandbytes' CPU inference repacking, which dequantize() misreads
    model = loaded.model.dequantize().float().eval()
    return Loaded(model, loaded.tokenizer, loaded.spec, loaded.path)


@dataclass
class LoadedEnsemble:
    """A loaded, verified ensemble: ``.denoiser()``, ``.generate(...)``, ``.elbo(...)``."""

    path: Path
    spec: EnsembleSpec
    roles: Roles
    general: Loaded
    specialist: Loaded
    base: Loaded | None
    user: str | None
    router: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.general.tokenizer

    @property
    def form(self) -> str:
        return self.roles.form

    @property
    def lam(self) -> float:
        return self.roles.lam

    def context_ids(self, context: str | list[int] | None) -> list[int] | None:
        """Token ids of a private context (text is encoded as a document: start token + text)."""
        if context is None or isinstance(context, list):
            return context or None
        from dlm_factory.dlm.data.corpus import Document, encode_documents

        return encode_documents(self.tokenizer, [Document("context", context)])[0]

    def denoiser(self, context: str | list[int] | None = None, *, lam: float | None = None) -> EnsembleDenoiser:
        """The combined Denoiser (the specialist side sees ``context``); ``lam`` overrides the stored lambda."""
        from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser

        cache = self.__dict__.setdefault("_denoisers", {})
        for key, loaded in (("general", self.general), ("specialist", self.specialist), ("base", self.base)):
            if loaded is not None and key not in cache:
                cache[key] = ModelDenoiser(serving(loaded))
        return EnsembleDenoiser.combine(self.form, self.lam if lam is None else lam, cache["general"],
                                        cache["specialist"], cache.get("base"), context=self.context_ids(context))

    def specialist_denoiser(self):
        """The specialist alone (the prefix_elbo router scores requests with it)."""
        self.denoiser()
        return self.__dict__["_denoisers"]["specialist"]

    def router_config(self):
        """The stored router settings as a ``RouterConfig`` (defaults where absent; a spec written
        before the n-gram router, which names no rule, routes by prefix ELBO as it did then)."""
        from dlm_factory.dlm.evaluation.router import RouterConfig

        known = {k: v for k, v in self.router.items() if k in RouterConfig.model_fields}
        known.setdefault("rule", "prefix_elbo")
        try:
            return RouterConfig(**known)
        except ValueError as e:
            raise FactoryError(f"{self.path}: invalid router settings ({e})") from None

    def router_scorer(self):
        """What routes requests to this user: the n-gram router (``router.safetensors``, its sha256
        checked against ENSEMBLE.json before it is read) or, for prefix_elbo, the specialist."""
        if self.router_config().rule == "prefix_elbo":
            return self.specialist_denoiser()
        if "_router" not in self.__dict__:
            from dlm_factory.dlm.evaluation.ngram import ROUTER_FILE, NgramLM

            path = self.path / ROUTER_FILE
            want = self.router.get("sha256")
            if not path.is_file():
                raise FactoryError(f"{self.path}: routes by prefix_ngram but has no {ROUTER_FILE}")
            got = "sha256:" + sha256_file(path)[1]
            if want != got:
                raise FactoryError(f"{path}: sha256 {got} does not match ENSEMBLE.json's router ({want})")
            self.__dict__["_router"] = NgramLM.load(path)
        return self.__dict__["_router"]

    def generate(self, prompts: list[str], cfg=None, *, context: str | list[int] | None = None,
                 on_step=None, chat: bool | None = None) -> list[str]:
        """Text in, text out, sampled from the combined distribution (``dlm.sampling.sample``)."""
        from dlm_factory.dlm.sampling.generate import encode_prompts
        from dlm_factory.dlm.sampling.sampler import SamplerConfig, sample

        cfg = cfg or SamplerConfig()
        tok = self.tokenizer
        if chat is None:
            chat = "instruct" in self.general.spec.stage_names()
        if chat:
            from dlm_factory.dlm.data.chat import encode_chat, ensure_chat_template

            ensure_chat_template(tok)
            prompt_ids = encode_chat(tok, [[{"role": "user", "content": p}] for p in prompts])
        else:
            prompt_ids = encode_prompts(tok, prompts)
        ids = sample(self.denoiser(context), prompt_ids, cfg, on_step=on_step)
        return [tok.decode(r, skip_special_tokens=True) for r in ids]

    def elbo(self, texts, *, seq_len: int = 128, stride: int | None = None, max_windows: int | None = None,
             n: int = 128, seed: int = 0, batch_size: int = 16, context: str | list[int] | None = None):
        """ELBO (bits/token, with its standard error) of documents under the combined distribution.

        ``texts``: strings (scored whole, on rolling windows) or a ``dlm.data.corpus.Windows``.
        """
        from dlm_factory.dlm.data.corpus import Document, Windows, rolling_windows
        from dlm_factory.dlm.evaluation.likelihood import elbo

        den = self.denoiser(context)
        if isinstance(texts, Windows):
            w = texts
        else:
            docs = [Document(f"doc-{i}", t) for i, t in enumerate([texts] if isinstance(texts, str) else texts)]
            w = rolling_windows(self.tokenizer, docs, seq_len, stride=stride, max_windows=max_windows,
                                max_positions=den.max_positions)
        return elbo(den, w.ids, attention_mask=w.attention_mask, keep=w.keep, n=n, seed=seed, batch_size=batch_size)


def load_ensemble(directory: str | os.PathLike, *, members: dict[str, str | os.PathLike] | None = None,
                  verify: bool = True) -> LoadedEnsemble:
    """Load the ensemble in ``directory``: read ENSEMBLE.json, find and verify every member, load them.

    ``members`` overrides where a member (by name) is; ``verify=False`` skips hashing the
    members (only for dirs you just verified yourself).
    """
    d = Path(directory).expanduser()
    spec = read_spec(d)
    r = roles(spec, str(d / ENSEMBLE_FILE))
    paths = {}
    for m in (r.general, r.specialist, r.base):
        if m is None:
            continue
        path = member_dir(d, m, members)
        if verify:
            verify_member(path, m)
        paths[m.name] = path
    loaded = {name: load_model(p) for name, p in paths.items()}
    for name, lo in loaded.items():
        if lo.spec is None:
            raise FactoryError(f"member {name}: an autoregressive checkpoint; ensemble members are diffusion LMs")
    ens = LoadedEnsemble(path=d.resolve(), spec=spec, roles=r, general=loaded[r.general.name],
                         specialist=loaded[r.specialist.name], base=loaded.get(r.base.name) if r.base else None,
                         user=ensemble_user(d), router=dict(spec.router or {}))
    ens.denoiser()  # the tokenizer check runs now: a mismatch is refused at load time
    return ens


def find_ensembles(root: str | os.PathLike) -> dict[str, Path]:
    """User -> ensemble dir: ``root`` itself when it holds ENSEMBLE.json, else ``root/<user>/``."""
    r = Path(root).expanduser()
    if (r / ENSEMBLE_FILE).is_file():
        user = ensemble_user(r)
        return {user or "": r}
    if not r.is_dir():
        raise FactoryError(f"{root}: no such ensemble dir")
    found = {}
    for sub in sorted(p for p in r.iterdir() if p.is_dir() and (p / ENSEMBLE_FILE).is_file()):
        user = check_user_id(sub.name)
        recorded = ensemble_user(sub)
        if recorded is not None and recorded != user:
            raise FactoryError(f"{sub}: the ensemble belongs to user {recorded!r}, not {user!r}")
        found[user] = sub
    if not found:
        raise FactoryError(f"{root}: no ensemble ({ENSEMBLE_FILE}) there or in its user subdirs")
    return found


def load_ensembles(root: str | os.PathLike, *, user: str | None = None, verify: bool = True) -> dict[str, LoadedEnsemble]:
    """The ensembles under ``root`` (see ``find_ensembles``); only ``user``'s when named.

    A user that has no ensemble there is one FactoryError line naming those that do.
    """
    found = find_ensembles(root)
    if user is not None:
        check_user_id(user)
        single = next(iter(found)) if len(found) == 1 else None
        if user not in found and not (single == "" and ensemble_user(found[""]) is None):
            have = ", ".join(sorted(u for u in found if u)) or "none recorded"
            raise FactoryError(f"user {user!r} has no ensemble in {root} (users: {have})")
        found = {user: found.get(user, found.get(""))}
    return {u: load_ensemble(p, verify=verify) for u, p in found.items()}


def routers(ensembles: dict[str, LoadedEnsemble], **overrides):
    """(RouterConfig, {user: scorer}) for routing among ``ensembles``: the first ensemble's settings
    (``overrides`` replace fields, e.g. prefix_tokens); every ensemble must route by the same rule."""
    configs = {u: e.router_config() for u, e in ensembles.items()}
    rules = {c.rule for c in configs.values()}
    if len(rules) > 1:
        by_rule = ", ".join(f"{u}: {c.rule}" for u, c in configs.items())
        raise FactoryError(f"the ensembles route by different rules ({by_rule}); rebuild them with one rule")
    first = next(iter(configs.values()))
    cfg = first.model_validate({**first.model_dump(), **overrides})
    return cfg, {u: e.router_scorer() for u, e in ensembles.items()}


def generate_routed(ensembles: dict[str, LoadedEnsemble], prompts: list[str], cfg=None, *,
                    context: str | None = None, on_step=None, chat: bool | None = None) -> tuple[list[str], list[str]]:
    """(user, text) per prompt: with one ensemble every prompt goes to it; with several, each prompt
    goes to the user whose router scores its prefix best (``dlm.evaluation.router``; ``routers``)."""
    from dlm_factory.dlm.evaluation.router import route
    from dlm_factory.dlm.sampling.generate import encode_prompts

    users = list(ensembles)
    if len(users) == 1:
        picked = users * len(prompts)
    else:
        rcfg, scorers = routers(ensembles)
        picked = route(scorers, encode_prompts(ensembles[users[0]].tokenizer, prompts), rcfg)
    texts: list[str] = [""] * len(prompts)
    for u in dict.fromkeys(picked):
        idx = [i for i, p in enumerate(picked) if p == u]
        out = ensembles[u].generate([prompts[i] for i in idx], cfg, context=context, on_step=on_step, chat=chat)
        for i, t in zip(idx, out, strict=True):
            texts[i] = t
    return picked, texts
