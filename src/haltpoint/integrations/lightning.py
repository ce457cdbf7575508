"""Lightning adapter: haltpoint's early stopping and checkpoints inside `Trainer.fit`.

Works with `lightning.pytorch` and with the standalone `pytorch_lightning` package (the
callback subclasses the first one installed and is duck-typed for the other). Importing this
module without either raises ImportError naming the extra to install.
"""

from __future__ import annotations

import functools
import importlib
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from haltpoint import (
    Checkpointer,
    CheckpointExistsError,
    CorruptCheckpointError,
    EarlyStopping,
    StateMismatchError,
)
from haltpoint.integrations._common import (
    announce_resume,
    check_arguments,
    load_stopper_state,
    missing_metric_error,
    restore_best_weights,
    scalar_metrics,
    snapshot_rng,
)
from haltpoint.state._common import short_repr

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback  # type: ignore[assignment]
    except ImportError as exc:
        raise ImportError(
            "haltpoint.integrations.lightning needs Lightning: pip install 'haltpoint[lightning]'"
        ) from exc

__all__ = ["HaltpointCallback"]

log = logging.getLogger(__name__)

_HINT = (
    "Log it in validation_step or on_validation_epoch_end with self.log({name!r}, value), or "
    "change the monitor (Lightning #374: a metric logged under another name, or only in "
    "training, never reaches early stopping)"
)
_HINT_TRAIN = (
    "With check_on_train_epoch_end=True, log it in training_step with self.log({name!r}, "
    "value, on_epoch=True) or in the LightningModule's on_train_epoch_end with "
    "self.log({name!r}, value), or change the monitor (Lightning #374: a metric logged under "
    "another name never reaches early stopping)"
)


class HaltpointCallback(Callback):
    """Early stopping and complete, resumable checkpoints for a Lightning `Trainer.fit`.

    At the end of every validation during `fit` (sanity checks excluded, and a validation at
    the same global step as the previous one skipped, with a warning) the callback reads
    `trainer.callback_metrics`, feeds them to `stopper`, agrees on the decision across ranks
    with `trainer.strategy.reduce_boolean_decision(stop, all=False)` (any rank stopping stops
    all) and sets `trainer.should_stop`; then it saves, on global rank 0 only, the
    LightningModule, every optimizer and LR scheduler, the precision plugin, the fit loop's
    progress (epoch, global step, batch position) and the stopper, under the global step.

    Args:
        stopper: the early-stopping rule, or None to only checkpoint. Its `monitor` must be
            logged during validation, else the first validation raises ValueError naming the
            metrics that were logged.
        checkpointer: where checkpoints go, or None to only stop early. The caller owns it
            (and closes it); the callback waits for its pending save at the end of training.
        restore_best: at the end of training, load the model weights of the best checkpoint
            (by the checkpointer's `monitor`) into the LightningModule, however training ended.
        resume: at the start of `fit`, restore the latest checkpoint of `checkpointer` (model,
            optimizers, schedulers, loop position, stopper, random state) and continue from
            there. Without it, a checkpointer that already holds checkpoints is refused.
        check_on_train_epoch_end: check (step the stopper and save) at the end of every
            training epoch instead of at the end of validation, as Lightning's flag of that
            name does: for a monitor logged in training (`self.log(..., on_epoch=True)` in
            `training_step`, or in the LightningModule's `on_train_epoch_end`), or a run
            without validation. The check runs after the LightningModule's hook, among
            Lightning's checkpoint callbacks (see `_EpochEndCheck`).

    Each callback's `state_key` is made from its monitor and settings (as Lightning's
    `EarlyStopping` does), so two callbacks that watch different metrics share a `Trainer`.

    Example:
        >>> import lightning.pytorch as pl  # doctest: +SKIP
        >>> stopper = EarlyStopping("val_loss", patience=3)
        >>> ckpt = Checkpointer("runs/exp1", monitor="val_loss", keep_best=1)  # doctest: +SKIP
        >>> with ckpt:  # doctest: +SKIP
        ...     callback = HaltpointCallback(stopper, ckpt, restore_best=True, resume=True)
        ...     trainer = pl.Trainer(max_epochs=50, callbacks=[callback])
        ...     trainer.fit(model, train_loader, val_loader)
    """

    def __init__(
        self,
        stopper: EarlyStopping | None = None,
        checkpointer: Checkpointer | None = None,
        *,
        restore_best: bool = False,
        resume: bool = False,
        check_on_train_epoch_end: bool = False,
    ) -> None:
        check_arguments(stopper, checkpointer, restore_best, resume)
        if not isinstance(check_on_train_epoch_end, bool):
            raise TypeError(
                f"check_on_train_epoch_end must be True or False, got {check_on_train_epoch_end!r}"
            )
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.stopper = stopper
        self.checkpointer = checkpointer
        self.restore_best = restore_best
        self.resume = resume
        self.best_step: int | None = None
        """The step of the checkpoint `restore_best` loaded, after `fit`."""
        self._last_step: int | None = None
        self._resumed_step: int | None = None
        self._resumed_done = False
        self._validations = 0
        self._warned_same_step = False
        self._put_back_rng: Callable[[], None] | None = None

    @property
    def state_key(self) -> str:
        """This callback's key in Lightning's checkpoints: its class, monitor and settings."""
        s, ckpt = self.stopper, self.checkpointer
        return self._generate_state_key(
            monitor=None if s is None else s.monitor,
            mode=None if s is None else s.mode,
            patience=None if s is None else s.patience,
            min_delta=None if s is None else s.min_delta,
            directory=None if ckpt is None else ckpt.directory,
            check_on_train_epoch_end=self.check_on_train_epoch_end,
        )

    # -- what is saved ----------------------------------------------------------------------

    def _state(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        state: dict[str, Any] = {"model": pl_module}
        for i, optimizer in enumerate(trainer.optimizers):
            state["optimizer" if i == 0 else f"optimizer_{i}"] = optimizer
        for i, config in enumerate(trainer.lr_scheduler_configs):
            state["scheduler" if i == 0 else f"scheduler_{i}"] = config.scheduler
        state["precision"] = trainer.precision_plugin
        state["loops"] = trainer.fit_loop
        state["trainer"] = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
        if self.stopper is not None:
            state["stopper"] = self.stopper
        return state

    # -- hooks --------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Resume from the latest checkpoint, or check that the directory is fresh."""
        self._validations, self._last_step, self._put_back_rng = 0, None, None
        self._resumed_step, self._resumed_done = None, False
        ckpt = self.checkpointer
        if ckpt is None:
            return
        _check_replicated(trainer.strategy)
        if self.resume:
            if getattr(trainer, "ckpt_path", None):
                raise ValueError(
                    "HaltpointCallback(resume=True) restores from its checkpointer; do not also "
                    f"pass ckpt_path={trainer.ckpt_path!r} to fit()"
                )
            fresh = trainer.fit_loop.state_dict()
            info = ckpt.restore(self._state(trainer, pl_module))
            if info is None:
                return
            _check_loop(fresh, trainer, info.step, ckpt.directory)
            self._last_step = self._resumed_step = info.step
            if ckpt.capture_rng:
                self._put_back_rng = snapshot_rng()
            finished = _finished(trainer)
            if trainer.is_global_zero:
                announce_resume(f"step {info.step} in {ckpt.directory}", self.stopper, finished)
            if finished is not None or (self.stopper is not None and self.stopper.stopped):
                self._resumed_done = True
                trainer.should_stop = True  # Lightning then trains nothing, nor calls on_train_end
                # The checkpoint was saved inside its epoch, before Lightning counted it done;
                # the first fit counted it when it ended, so trainer.current_epoch agrees.
                progress = trainer.fit_loop.epoch_progress.current
                progress.completed += 1
                progress.processed = max(progress.processed, progress.completed)
                if self.restore_best:
                    self._restore_best(pl_module)
        elif ckpt.list():
            steps = [info.step for info in ckpt.list()]
            raise CheckpointExistsError(
                f"{ckpt.directory} already holds checkpoints (steps {steps}); pass "
                "HaltpointCallback(..., resume=True) to continue that run, or use a new directory",
                path=ckpt.directory,
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """A fit whose stopper had already stopped trains nothing, and says so.

        `resume=True` found that in `on_fit_start`. This catches the others, once every
        state is restored: Lightning's own `fit(ckpt_path=...)` of a stopped run (the stopper
        rides in its checkpoint, `load_state_dict`), or a second `fit` with a stopper that
        stopped in the first. Lightning would train on until the next check.
        """
        if self._resumed_done or self.stopper is None or not self.stopper.stopped:
            return
        self._resumed_done = True
        if trainer.is_global_zero:
            announce_resume(getattr(trainer, "ckpt_path", None), self.stopper)
        trainer.should_stop = True

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """After a resume, put the restored random state back if this epoch makes its iterator.

        Lightning creates a data-loader iterator (a draw from the global RNG, and the shuffled
        order) at the start of every fit, after `on_fit_start` restored the random state. The
        first epoch of a resumed fit uses that iterator, unless Lightning first replayed the
        end of the saved epoch (the fit loop is then no longer resuming): that epoch makes a
        new iterator, as in an uninterrupted run, so the state is put back before it.
        """
        if self._put_back_rng is None:
            return
        put_back, self._put_back_rng = self._put_back_rng, None
        loop = trainer.fit_loop
        if not (loop.is_resuming or loop.epoch_loop.restarting):
            put_back()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """With `check_on_train_epoch_end`, put this fit's `_EpochEndCheck` into the Trainer."""
        _detach_epoch_end_check(trainer, self)  # never two, whatever an earlier fit left
        if stage == "fit" and self.check_on_train_epoch_end:
            _attach_epoch_end_check(trainer, self)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Take this callback's `_EpochEndCheck` out of the Trainer again."""
        _detach_epoch_end_check(trainer, self)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Check, unless checks are at the end of training epochs."""
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.check_on_train_epoch_end:
            return
        self._check(trainer, pl_module, "at the end of validation")

    def _check(self, trainer: Any, pl_module: Any, where: str) -> None:
        """Step the stopper, agree on stopping across ranks, and save."""
        self._validations += 1
        if trainer.global_step == self._resumed_step:
            # Lightning replays the end of the epoch the resumed checkpoint was saved in (with
            # max_steps, or a save at validation end): already counted, already saved.
            log.debug("haltpoint: skipped the replayed check at step %d", trainer.global_step)
            return
        if trainer.global_step == self._last_step:
            # No optimizer step since the last validation (gradient accumulation, or validation
            # more often than optimizer steps): the same weights, so neither counted nor saved.
            if not self._warned_same_step:
                self._warned_same_step = True
                warnings.warn(
                    f"haltpoint: a second validation at global step {trainer.global_step} sees "
                    "the weights already judged; it is neither counted by the stopper nor saved. "
                    "Validate at most once per optimizer step",
                    stacklevel=2,
                )
            return
        metrics = scalar_metrics(trainer.callback_metrics)
        needed = [self.stopper.monitor if self.stopper else None]
        needed.append(self.checkpointer.monitor if self.checkpointer else None)
        for name in needed:
            if name is not None and name not in metrics:
                raise missing_metric_error(
                    name,
                    metrics,
                    f"{where} (epoch {trainer.current_epoch}, global step {trainer.global_step})",
                    (_HINT_TRAIN if self.check_on_train_epoch_end else _HINT).format(name=name),
                )
        stop = False
        if self.stopper is not None:
            decision = self.stopper.step(metrics)
            stop = bool(decision)
            if stop:
                log.info("%shaltpoint: %s", _rank_prefix(trainer), decision.reason)
        if self.stopper is not None:
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
            trainer.should_stop = trainer.should_stop or stop
        self._save(trainer, pl_module, metrics)

    def _save(self, trainer: Any, pl_module: Any, metrics: dict[str, float]) -> None:
        self._last_step = trainer.global_step
        if self.checkpointer is not None and trainer.is_global_zero:
            self.checkpointer.save(trainer.global_step, self._state(trainer, pl_module), metrics)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Warn when no validation ran; restore the best weights when asked."""
        unchecked = self._validations == 0 and not self.check_on_train_epoch_end
        # a resumed fit was checked before (its checkpoint comes from a check): the batches
        # after the run's last check, trained again, need no validation of their own
        unchecked = unchecked and self._resumed_step is None and not self._resumed_done
        if unchecked and self.stopper is not None:
            warnings.warn(
                f"haltpoint: no validation ran during fit, so early stopping on "
                f"{self.stopper.monitor!r} was never checked and nothing was saved; define "
                "validation_step and pass a val dataloader, or check limit_val_batches and "
                "check_val_every_n_epoch; for a metric logged in training, pass "
                "HaltpointCallback(..., check_on_train_epoch_end=True) to check at the end of "
                "every training epoch (Lightning's EarlyStopping does so by default when "
                "validation runs once an epoch or not at all)",
                stacklevel=2,
            )
        ckpt = self.checkpointer
        if ckpt is None:
            return
        if trainer.is_global_zero:
            ckpt.wait()
        trainer.strategy.barrier("haltpoint_train_end")
        if self.restore_best:
            self._restore_best(pl_module)

    def _restore_best(self, pl_module: Any) -> None:
        assert self.checkpointer is not None
        if self.checkpointer.list():
            self.best_step = restore_best_weights(self.checkpointer, pl_module, self.stopper)
            log.info("haltpoint: restored the best weights, from step %d", self.best_step)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Finish the save in flight so that no committed work is lost."""
        _detach_epoch_end_check(trainer, self)  # Lightning skips teardown after an error
        if self.checkpointer is not None and trainer.is_global_zero:
            try:
                self.checkpointer.wait()
            except Exception as exc:  # the training error stays the one raised
                warnings.warn(f"haltpoint: the last save failed too: {exc}", stacklevel=2)

    # -- Lightning's own checkpoints (ModelCheckpoint + ckpt_path) keep the stopper too ------

    def state_dict(self) -> dict[str, Any]:
        """The stopper's state, for Lightning's own checkpoints."""
        return {"stopper": None if self.stopper is None else self.stopper.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stopper's state from a Lightning checkpoint.

        Raises:
            StateMismatchError: the checkpoint holds something else than this callback saved,
                or a stopper state this stopper cannot load.
        """
        where = f"the Lightning checkpoint's state of {type(self).__name__}"
        if not isinstance(state_dict, Mapping):
            raise StateMismatchError(
                f"{where} is {short_repr(state_dict)}, not the {{'stopper': ...}} it saves"
            )
        saved = state_dict.get("stopper")
        if saved is not None and self.stopper is not None:
            load_stopper_state(self.stopper, saved, where)


class _EpochEndCheck:
    """Runs its owner's check at the end of a training epoch, after the LightningModule's hook.

    Lightning calls `on_train_epoch_end` of every callback first, then the LightningModule's,
    then again only for its "monitoring" callbacks (`isinstance(cb, (EarlyStopping,
    Checkpoint))`, lightning/pytorch/loops/fit_loop.py), so that they see what the module logs
    there. `HaltpointCallback` itself subclasses neither: as a `Checkpoint` it would make
    `Trainer(enable_checkpointing=False)` raise, even with no checkpointer, and take over
    `trainer.checkpoint_callback` (`test(ckpt_path="best")` then fails on `best_model_path`)
    from a `ModelCheckpoint` listed after it. So only during `fit`, this small `Checkpoint` of
    the running Trainer's package stands in the callback list just before the other checkpoint
    callbacks: after Lightning's `EarlyStopping`s, as Lightning runs them, and before any
    `ModelCheckpoint`, which then saves the stopper's new state. During `fit` it is therefore
    `trainer.checkpoint_callback`; after `fit` (or an error) it is gone.
    """

    def __init__(self, owner: HaltpointCallback) -> None:
        self.owner = owner

    @property
    def state_key(self) -> str:
        """Its owner's key, marked: it holds no state of its own."""
        return f"{self.owner.state_key}[train_epoch_end]"

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """The owner's check, once the LightningModule's `on_train_epoch_end` has logged."""
        self.owner._check(trainer, pl_module, "at the end of the training epoch")


def _check_loop(fresh: Mapping[str, Any], trainer: Any, step: int, directory: str) -> None:
    """Check the fit loop's state restored from the checkpoint of `step`: each counter that a
    fresh loop (`fresh`, its `state_dict()`) holds as an int or a bool (the progress
    trackers, `is_last_batch`, `_batches_that_stepped`) is one again, the ints >= 0, and the
    global step is `step`, under which the callback saved it. Lightning's loops take any
    value (their `load_state_dict` updates `__dict__`): a crafted manifest, its checksum
    valid, made `fit` fail later with a TypeError deep inside Lightning.

    Raises:
        CorruptCheckpointError: naming the step and the first counter that is wrong.
    """
    stack: list[tuple[str, Any, Any]] = [("", fresh, trainer.fit_loop.state_dict())]
    while stack:
        where, mine, theirs = stack.pop()
        if isinstance(mine, Mapping):
            if not isinstance(theirs, Mapping):
                wrong = f"{where or 'the fit loop'} is a {type(theirs).__name__}, not a mapping"
                break
            stack.extend(
                (f"{where}.{k}".lstrip("."), v, theirs[k]) for k, v in mine.items() if k in theirs
            )
        elif type(mine) in (int, bool) and (
            type(theirs) is not type(mine) or (type(theirs) is int and theirs < 0)
        ):
            kind = "an int >= 0" if type(mine) is int else "a bool"
            wrong = f"{where} is {short_repr(theirs)}, not {kind}"
            break
    else:
        if trainer.global_step == step:
            return
        wrong = f"the global step it gives is {trainer.global_step}, not {step}"
    raise CorruptCheckpointError(
        f"the checkpoint of step {step} in {directory} restored a fit loop Lightning cannot "
        f"run: {wrong}; the manifest was altered or written by other code: resume from "
        "another step, or a new directory",
        path=directory,
    )


def _finished(trainer: Any) -> str | None:
    """Why a restored fit has nothing left to train (`max_steps` or `max_epochs`), or None.

    The saved epoch counts as trained when its last batch ran: the checkpoints are saved at
    the end of a validation or of a training epoch, before Lightning counts that epoch done.
    """
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return f"it reached max_steps={trainer.max_steps}"
    loop = trainer.fit_loop
    epochs = loop.epoch_progress.current.completed + loop.epoch_loop.batch_progress.is_last_batch
    if trainer.max_epochs not in (None, -1) and epochs >= trainer.max_epochs:
        return f"it reached max_epochs={trainer.max_epochs}"
    return None


def _rank_prefix(trainer: Any) -> str:
    """`[rank: N] ` under several processes, as Lightning prefixes its own log lines; else ''."""
    return f"[rank: {trainer.global_rank}] " if trainer.world_size > 1 else ""


def _checkpoint_base(trainer: Any) -> Any:
    """`Checkpoint` of the package whose Trainer runs: `pytorch_lightning` or `lightning`."""
    standalone = any(c.__module__.startswith("pytorch_lightning.") for c in type(trainer).__mro__)
    package = "pytorch_lightning" if standalone else "lightning.pytorch"
    return importlib.import_module(f"{package}.callbacks").Checkpoint


@functools.cache
def _epoch_end_check_class(checkpoint: type) -> type:
    return type("HaltpointEpochEndCheck", (_EpochEndCheck, checkpoint), {})


def _attach_epoch_end_check(trainer: Any, owner: HaltpointCallback) -> None:
    checkpoint = _checkpoint_base(trainer)
    callbacks = list(trainer.callbacks)  # a new list: Lightning is iterating over the old one
    first = next((i for i, c in enumerate(callbacks) if isinstance(c, checkpoint)), len(callbacks))
    callbacks.insert(first, _epoch_end_check_class(checkpoint)(owner))
    trainer.callbacks = callbacks


def _detach_epoch_end_check(trainer: Any, owner: HaltpointCallback) -> None:
    kept = [
        c for c in trainer.callbacks if not (isinstance(c, _EpochEndCheck) and c.owner is owner)
    ]
    if len(kept) < len(trainer.callbacks):
        trainer.callbacks = kept  # a new list, as above


_SHARDED_STRATEGIES = {
    "FSDPStrategy",
    "DeepSpeedStrategy",
    "ModelParallelStrategy",
    "XLAFSDPStrategy",
}


def _check_replicated(strategy: Any) -> None:
    """Refuse strategies that shard the model: the callback saves from global rank 0 only.

    Under them rank 0 holds a shard, and its `state_dict()` may wait for the other ranks
    (FSDP gathers), so saving there alone would lose state or hang.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if names & _SHARDED_STRATEGIES:
        raise ValueError(
            f"HaltpointCallback with a checkpointer supports strategies that replicate the model "
            f"(single device, DDP), not {type(strategy).__name__}: it saves from global rank 0 "
            "only. For FSDP2, save with haltpoint's Checkpointer on every rank in your own loop "
            "(docs/distributed.md, 'Sharded state'), or pass checkpointer=None to only stop early"
        )
