"""The cross-field checks of the objective and the adapter's variants (load.validate calls them): what
each train.objective measures and can be monitored by, its knobs, and what cannot be combined."""

from __future__ import annotations

import difflib

from qlora_loop.config.sections import GRPO_METRICS, PREFERENCE_METRICS, Config, resolved_beta
from qlora_loop.errors import ConfigError


def check_monitor(cfg: Config) -> None:
    """train.monitor is a loss or one of eval.metrics (scores, higher is better: mode max); each needs
    the data it is measured on."""
    t, metrics = cfg.train, cfg.eval.metrics
    own = objective_metrics(cfg)
    measured = [*metrics, *own]
    if t.objective == "grpo" and t.monitor == "val_loss":
        raise ConfigError("train.monitor=val_loss: train.objective=grpo has no validation loss (its loss depends on "
                          "sampled completions); monitor the validation reward with train.monitor=reward "
                          "train.mode=max, or train_loss")
    if t.monitor not in ("val_loss", "train_loss", *measured):
        close = difflib.get_close_matches(t.monitor, ["val_loss", "train_loss", *measured], n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        more = f", nor one of train.objective={t.objective}'s {own}" if own else ""
        raise ConfigError(f"train.monitor={t.monitor!r} is neither val_loss, train_loss nor a metric of "
                          f"eval.metrics={metrics}{more}; {hint}add it to eval.metrics to monitor it")
    if (t.monitor in ("reward_accuracy", "reward_margin") or t.monitor.startswith("reward")) and t.mode != "max":
        raise ConfigError(f"train.monitor={t.monitor}: higher is better, set train.mode=max")
    if t.monitor in metrics and t.mode != "max":
        raise ConfigError(f"train.monitor={t.monitor} is a score, higher is better: set train.mode=max")
    no_val = cfg.data.val is None and cfg.data.val_split == 0
    if t.monitor == "val_loss" and no_val:
        raise ConfigError("train.monitor=val_loss needs validation data: set data.val, or data.val_split > 0, "
                          "or monitor train_loss with train.monitor=train_loss")
    if metrics and no_val:
        raise ConfigError(f"eval.metrics={metrics} scores replies to validation rows: set data.val, or "
                          "data.val_split > 0, or eval.metrics=[]")
    if t.monitor in own and no_val:
        raise ConfigError(f"train.monitor={t.monitor} is measured on validation rows: set data.val, or "
                          "data.val_split > 0, or monitor train_loss")
    if cfg.eval.metrics_rows is not None and not cfg.eval.metrics_rows > 0:
        raise ConfigError(f"eval.metrics_rows={cfg.eval.metrics_rows!r} must be > 0, or null for all rows")


def objective_metrics(cfg: Config) -> list[str]:
    """What train.objective measures at each evaluation beside eval.metrics: a preference objective's
    PREFERENCE_METRICS; grpo's reward and reward/NAME of each of train.rewards."""
    t = cfg.train
    if t.objective == "grpo":
        names = [r.get("name") if isinstance(r, dict) else r for r in t.rewards]
        return [*GRPO_METRICS, *(f"reward/{n}" for n in names)]
    return list(PREFERENCE_METRICS) if t.objective != "sft" else []


def check_objective(cfg: Config) -> None:
    """A preference objective's or grpo's knobs, and what it cannot be combined with."""
    t = cfg.train
    beta = resolved_beta(t)
    if t.objective == "grpo":
        check_grpo(cfg)
    elif not beta > 0:
        raise ConfigError(f"train.beta={t.beta!r} must be > 0")
    if not 0 <= t.label_smoothing < 0.5:
        raise ConfigError(f"train.label_smoothing={t.label_smoothing!r} must be in [0, 0.5)")
    if not t.nll_weight >= 0:
        raise ConfigError(f"train.nll_weight={t.nll_weight!r} must be >= 0")
    if cfg.adapter.kind == "adalora" and cfg.adapter.init_from:
        raise ConfigError("adapter.init_from continues a LoRA adapter; with adapter.kind=adalora start fresh "
                          "(adapter.init_from=null)")
    if t.objective != "sft" and cfg.data.packing:
        raise ConfigError(f"data.packing=true with train.objective={t.objective}: an answer's log-prob is taken on "
                          "its own padded row; set data.packing=false")


def check_grpo(cfg: Config) -> None:
    t = cfg.train
    if not resolved_beta(t) >= 0:
        raise ConfigError(f"train.beta={t.beta!r} must be >= 0 (0: no KL term, no reference pass)")
    if not t.num_generations >= 2:
        raise ConfigError(f"train.num_generations={t.num_generations!r} must be >= 2: advantages compare the "
                          "completions of one prompt")
    for key in ("max_new_tokens", "temperature"):
        if not getattr(t, key) > 0:
            raise ConfigError(f"train.{key}={getattr(t, key)!r} must be > 0")
    if not isinstance(t.rewards, list) or not t.rewards:
        raise ConfigError(f"train.rewards={t.rewards!r}: give a list of rewards, e.g. [exact_match]")
    if cfg.adapter.init == "eva":
        raise ConfigError("adapter.init=eva with train.objective=grpo: EVA fits A to the inputs of trained answer "
                          "tokens, and GRPO rows have none until they are sampled; use adapter.init=default")


def check_variants(cfg: Config) -> None:
    """LoRA's variants (DoRA, rsLoRA, the initialisations, LoRA+, NEFTune): their values, and what they
    cannot be combined with."""
    a, t = cfg.adapter, cfg.train
    for key, value in (("train.loraplus_lr_ratio", t.loraplus_lr_ratio), ("train.neftune_alpha", t.neftune_alpha)):
        if value is not None and not value > 0:
            raise ConfigError(f"{key}={value!r} must be > 0, or null to leave it out")
    if a.kind == "adalora":
        taken = [k for k, on in (("adapter.use_dora", a.use_dora), ("adapter.use_rslora", a.use_rslora),
                                 (f"adapter.init={a.init}", a.init != "default"),
                                 ("train.loraplus_lr_ratio", t.loraplus_lr_ratio is not None)) if on]
        if taken:
            raise ConfigError(f"adapter.kind=adalora cannot take {', '.join(taken)}: AdaLoRA's SVD-form adapter "
                              "(P, Lambda, Q) has no B matrix, magnitude or LoRA init of these; use adapter.kind=lora")
    if a.init_from and a.init != "default":
        raise ConfigError(f"adapter.init={a.init} with adapter.init_from: a continued adapter starts from its saved "
                          "weights; drop one of them")
    if a.use_dora and a.init in ("pissa", "loftq", "eva"):
        raise ConfigError(f"adapter.use_dora with adapter.init={a.init}: DoRA's magnitudes are taken from the base "
                          "weights at the start, which this init does not account for; use one of them")
