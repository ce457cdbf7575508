"""Hugging Face Trainer adapter: haltpoint's early stopping and checkpoints inside `Trainer.train`.

Importing this module without `transformers` raises ImportError naming the extra to install.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch

from haltpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointExistsError,
    CorruptCheckpointError,
    EarlyStopping,
    StateMismatchError,
)
from haltpoint.distributed import initialized
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
from haltpoint.store.storage import open_regular

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState, TrainerState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "haltpoint.integrations.transformers needs the Hugging Face Trainer: "
        "pip install 'haltpoint[transformers]'"
    ) from exc

__all__ = ["HaltpointCallback"]

log = logging.getLogger(__name__)

_PREFIX = "eval_"
_BOOKKEEPING_NAMES = ("epoch", "step", "total_flos")
_BOOKKEEPING_ENDS = ("_runtime", "_per_second", "_preparation_time", "_compilation_time")
_HINT = (
    "The Trainer prefixes evaluation metrics with 'eval_' (metric_key_prefix); monitor "
    "'eval_<name>' or '<name>', and return it from compute_metrics if it is not the loss "
    "(transformers #28530: a metric that is not there silently disables early stopping)"
)


class HaltpointCallback(TrainerCallback, ExportableState):
    """Early stopping and complete, resumable checkpoints for a Hugging Face `Trainer`.

    At every evaluation during `train()` the callback reads the metrics (a monitor named
    `"loss"` finds `"eval_loss"`), feeds them to `stopper` and sets
    `control.should_training_stop`; then it saves, on the main process only, the model (in a
    safetensors file), the optimizer, the LR scheduler, the Trainer's position (global step,
    epoch) and the stopper, under the global step, whatever `save_strategy` says.

    Args:
        stopper: the early-stopping rule, or None to only checkpoint. The Trainer must
            evaluate (`eval_strategy="steps"` or `"epoch"`), and the monitor must be among the
            metrics, else the first evaluation raises ValueError naming the metrics there.
        checkpointer: where checkpoints go, or None to only stop early. The caller owns it
            (and closes it); the callback waits for its pending save at the end of training.
        restore_best: at the end of training, load the weights of the best checkpoint (by the
            checkpointer's `monitor`) into the model, however training ended; no
            `load_best_model_at_end`, `metric_for_best_model` or matching `save_strategy` needed.
        resume: at the start of `train()`, restore the latest checkpoint (model, optimizer,
            scheduler, random state, stopper) and continue from its global step. Without it, a
            checkpointer that already holds checkpoints is refused.

    The stopper's state also rides in the Trainer's own checkpoints (the callback is an
    `ExportableState`), so `trainer.train(resume_from_checkpoint=...)` restores it too; leave
    `restore_callback_states_from_checkpoint` off (the Trainer would rebuild the callback
    without its stopper and checkpointer, so it is refused).

    Example:
        >>> from transformers import Trainer, TrainingArguments  # doctest: +SKIP
        >>> stopper = EarlyStopping("eval_loss", patience=3)
        >>> ckpt = Checkpointer("runs/exp1", monitor="eval_loss", keep_best=1)  # doctest: +SKIP
        >>> callback = HaltpointCallback(stopper, ckpt, restore_best=True)  # doctest: +SKIP
        >>> args = TrainingArguments("out", eval_strategy="epoch")  # doctest: +SKIP
        >>> Trainer(model, args, train_dataset=train, eval_dataset=val,
        ...         callbacks=[callback]).train()  # doctest: +SKIP
    """

    def __init__(
        self,
        stopper: EarlyStopping | None = None,
        checkpointer: Checkpointer | None = None,
        *,
        restore_best: bool = False,
        resume: bool = False,
    ) -> None:
        check_arguments(stopper, checkpointer, restore_best, resume)
        self.stopper = stopper
        self.checkpointer = checkpointer
        self.restore_best = restore_best
        self.resume = resume
        self.best_step: int | None = None
        """The step of the checkpoint `restore_best` loaded, after `train()`."""
        self._training = False
        self._evaluations = 0
        self._last_step: int | None = None
        self._epoch_offset = 0.0
        self._resumed_done = False
        self._position: tuple[int, float | None] = (0, None)  # where a finished run stands
        self._eval_on_start: tuple[Any, bool] | None = None  # (args, value) to put back
        self._put_back: Callable[[], None] | None = None  # a finished run's state, in memory
        # the step the Trainer counts this train()'s steps from, and the one training resumed
        # at (ours, when restored from the checkpointer): its end-of-training figures differ
        self._counted_from, self._trained_from = 0, 0
        self._logged_from = 0  # the Trainer's step of its last loss line (it divides by since)

    # -- the Trainer's own checkpoints (resume_from_checkpoint) keep the stopper too ---------

    @property
    def state_key(self) -> str:
        """Which of several HaltpointCallbacks in one Trainer a state in the Trainer's
        checkpoint belongs to: the stopper's monitor, mode, patience and min_delta, and the
        checkpoint directory (as the Lightning adapter's `state_key`)."""
        s, ckpt = self.stopper, self.checkpointer
        settings = {
            "monitor": None if s is None else s.monitor,
            "mode": None if s is None else s.mode,
            "patience": None if s is None else s.patience,
            "min_delta": None if s is None else repr(s.min_delta),
            "directory": None if ckpt is None else str(ckpt.directory),
        }
        return f"{type(self).__name__}{settings}"

    def state(self) -> dict[str, Any]:
        """The stopper's state, for the Trainer's checkpoints (`trainer_state.json`), with
        this callback's `state_key` to find it among several HaltpointCallbacks' states."""
        saved = None if self.stopper is None else self.stopper.state_dict()
        return {"args": {}, "attributes": {"stopper_state": saved, "key": self.state_key}}

    def _own_entry(self, entries: list[Any]) -> Any:
        """This callback's newest state among several HaltpointCallbacks' in the Trainer's
        checkpoint.

        The Trainer keeps the states of several callbacks of one class as a list: their states
        at the start of training, to which every save appends each callback's state again, in
        the callbacks' order. So the newest state of a callback is the last entry with its
        `state_key`; failing that (settings changed on resume, or a state saved before the
        key was), the last whose stopper has this stopper's monitor and mode; failing that,
        the last entry, which then fails to load with a message naming the mismatch.
        """

        def attributes(entry: Any) -> dict[str, Any]:
            found = entry.get("attributes") if isinstance(entry, dict) else None
            return found if isinstance(found, dict) else {}

        for entry in reversed(entries):
            if attributes(entry).get("key") == self.state_key:
                return entry
        if self.stopper is not None:
            for entry in reversed(entries):
                saved = attributes(entry).get("stopper_state")
                if (
                    isinstance(saved, dict)
                    and saved.get("monitor") == self.stopper.monitor
                    and saved.get("mode") == self.stopper.mode
                ):
                    return entry
        return entries[-1]

    def _restore_exported(self, args: Any, state: Any) -> bool:
        """Load the stopper's state from the Trainer's checkpoint being resumed, if any;
        whether it had stopped."""
        exported = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if exported is None or not state.global_step:
            return False
        if getattr(args, "restore_callback_states_from_checkpoint", False):
            raise ValueError(
                "HaltpointCallback restores its stopper from the Trainer's checkpoint itself; "
                "pass TrainingArguments(restore_callback_states_from_checkpoint=False), since "
                "the Trainer would rebuild the callback without its stopper and checkpointer"
            )
        if isinstance(exported, list) and exported:
            exported = self._own_entry(exported)
        attributes = exported.get("attributes") if isinstance(exported, dict) else None
        if not isinstance(attributes, dict):
            raise StateMismatchError(
                "the resumed checkpoint's trainer_state.json holds stateful_callbacks"
                f"['{type(self).__name__}'] = {short_repr(exported)}, not the "
                "{'attributes': {'stopper_state': ...}} HaltpointCallback saves: it was altered "
                "or written by other code; resume from another checkpoint"
            )
        saved = attributes.get("stopper_state")
        if saved is None or self.stopper is None:
            return False
        load_stopper_state(self.stopper, saved, "the resumed checkpoint's trainer_state.json")
        return self.stopper.stopped

    # -- what is saved ----------------------------------------------------------------------

    def _state(self, state: Any, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        saved: dict[str, Any] = {"model": model}
        if optimizer is not None:
            saved["optimizer"] = optimizer
        if scheduler is not None:
            saved["scheduler"] = scheduler
        saved["trainer"] = {
            "global_step": state.global_step,
            "epoch": state.epoch or 0.0,
            "max_steps": state.max_steps,
        }
        if self.stopper is not None:
            saved["stopper"] = self.stopper
        return saved

    # -- hooks --------------------------------------------------------------------------------

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        """Check the evaluation strategy; resume, or check that the directory is fresh."""
        self._put_back_eval_on_start()  # an earlier train() that failed before its first epoch
        self._training, self._evaluations, self._epoch_offset = True, 0, 0.0
        self._last_step, self._resumed_done, self._put_back = None, False, None
        start = getattr(state, "global_step", 0) or 0  # what the Trainer counts steps from
        self._counted_from = self._trained_from = self._logged_from = start
        if self.stopper is not None and str(getattr(args, "eval_strategy", "no")) in (
            "no",
            "IntervalStrategy.NO",
        ):
            raise ValueError(
                "HaltpointCallback with a stopper needs evaluations: pass "
                "TrainingArguments(eval_strategy='steps' or 'epoch') and an eval_dataset"
            )
        if not self.resume and self._restore_exported(args, state):
            # the Trainer's own checkpoint of a stopped run (resume_from_checkpoint)
            if state.is_world_process_zero:
                where = f"the Trainer's checkpoint of step {state.global_step}"
                announce_resume(where, self.stopper)
            self._finish(args, state, control)
        ckpt = self.checkpointer
        if ckpt is None:
            return
        _check_replicated(args)
        if not self.resume:
            if ckpt.list():
                steps = [info.step for info in ckpt.list()]
                raise CheckpointExistsError(
                    f"{ckpt.directory} already holds checkpoints (steps {steps}); pass "
                    "HaltpointCallback(..., resume=True) to continue that run, or use a new "
                    "directory",
                    path=ckpt.directory,
                )
            return
        saved = self._state(state, model, optimizer, lr_scheduler)
        info = ckpt.restore(saved)
        if info is None:
            return
        self._last_step, self._epoch_offset = _position(saved, info.step, ckpt.directory)
        state.global_step, state.epoch = self._last_step, self._epoch_offset
        self._trained_from = self._last_step
        if getattr(args, "load_best_model_at_end", False):
            _restore_trainer_best(args, state)
        finished = None
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            finished = f"it reached max_steps={state.max_steps}"
        if state.is_world_process_zero:
            announce_resume(f"step {info.step} in {ckpt.directory}", self.stopper, finished)
        if finished is not None or (self.stopper is not None and self.stopper.stopped):
            self._finish(args, state, control)

    def _finish(self, args: Any, state: Any, control: Any) -> None:
        """Train nothing more: the run restored had stopped or finished."""
        control.should_training_stop = True  # the Trainer still runs one step first
        self._resumed_done, self._position = True, (state.global_step, state.epoch)
        if getattr(args, "eval_on_start", False):
            # The Trainer evaluates right after this hook, whatever `control` says: the
            # flag is turned off for that moment and put back at `on_epoch_begin`.
            self._eval_on_start = (args, args.eval_on_start)
            args.eval_on_start = False

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Put back the `eval_on_start` a finished run's `on_train_begin` turned off."""
        self._put_back_eval_on_start()

    def _put_back_eval_on_start(self) -> None:
        if self._eval_on_start is not None:
            args, value = self._eval_on_start
            self._eval_on_start = None
            args.eval_on_start = value

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """On a finished run with no checkpoint of ours to load back (the Trainer's own
        `resume_from_checkpoint`), hold the state the Trainer resumed, in memory, for
        `on_step_end` to put back after the one step the Trainer takes before it stops."""
        if self._resumed_done and self._last_step is None and self._put_back is None:
            objects = (kwargs.get(k) for k in ("model", "optimizer", "lr_scheduler"))
            self._put_back = _hold([obj for obj in objects if obj is not None])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After a resume, count epochs from the resumed position (the Trainer restarts at 0);
        on a finished run, undo the one step the Trainer takes before it stops."""
        if self._resumed_done and self._last_step is not None:
            self._undo_step(state, control, kwargs)
        elif self._resumed_done:  # no checkpoint of ours: the state held at on_step_begin
            if self._put_back is not None:
                put_back, self._put_back = self._put_back, lambda: None  # once per train()
                put_back()
            state.global_step, state.epoch = self._position
            _skip_evaluate_save_log(control)
        elif self._epoch_offset and state.epoch is not None:
            state.epoch += self._epoch_offset

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """On a finished run, keep the Trainer from evaluating or saving at the epoch's end."""
        if self._resumed_done:
            _skip_evaluate_save_log(control)

    def _undo_step(self, state: Any, control: Any, objects: dict[str, Any]) -> None:
        """Put back the model, optimizer, scheduler and position of the finished run's
        checkpoint, and cancel what the Trainer planned after the step (evaluate, save, log).

        `control.should_training_stop` set at `on_train_begin` is only read after a step, so a
        finished run, run again, would otherwise train one more step and save it as the
        Trainer's `checkpoint-<N+1>` (its end-of-training save).
        """
        assert self.checkpointer is not None and self._last_step is not None
        saved = self._state(
            state, objects.get("model"), objects.get("optimizer"), objects.get("lr_scheduler")
        )
        self.checkpointer.restore(saved, self._last_step)
        position = _position(saved, self._last_step, self.checkpointer.directory)
        state.global_step, state.epoch = position
        _skip_evaluate_save_log(control)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Put right the Trainer's loss figures for the steps this train() trained.

        The Trainer divides by the steps since the global step it started at, before this
        callback's resume moved it: after a resume from the checkpointer the first `loss`
        line and the end-of-training `train_loss` (and speeds) came out divided by every step
        of the run, and a finished run, run again, logged the loss of the one step it cancels.
        Now they count the steps trained, and a finished run's end line says it trained none
        (`train_loss` NaN, 0 per second), in the printed line, `log_history` and the metrics
        `train()` returns (not its `training_loss`, which the callback cannot reach, nor
        loggers that ran before this callback).
        """
        if not self._training or not logs:
            return
        key = "train_loss" if "train_runtime" in logs else "loss"
        if key not in logs:
            return
        entries = [logs]
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and last.get(key) == logs[key]:
            entries.append(last)  # the copy the Trainer appended just before on_log
        if key == "loss":
            counted = state.global_step - self._logged_from
            trained = state.global_step - max(self._logged_from, self._trained_from)
            self._logged_from = state.global_step
            if 0 < trained < counted:
                for entry in entries:
                    entry["loss"] = entry["loss"] * counted / trained
            return
        counted = state.global_step - self._counted_from
        trained = 0 if self._resumed_done else state.global_step - self._trained_from
        if trained > 0 and (trained == counted or counted <= 0):
            return  # counted right, or nothing to scale from
        speeds = ("train_samples_per_second", "train_steps_per_second")
        for entry in entries:
            if trained <= 0:
                entry["train_loss"] = math.nan
                entry.update({speed: 0.0 for speed in speeds if speed in entry})
                continue
            entry["train_loss"] = entry["train_loss"] * counted / trained
            for speed in speeds:
                if isinstance(entry.get(speed), (int, float)):
                    entry[speed] = round(entry[speed] * trained / counted, 3)

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, Any] | None = None,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        """Step the stopper, set `should_training_stop`, and save."""
        if not self._training or self._resumed_done:
            return  # trainer.evaluate() outside train(), or after the one step of a finished run
        self._evaluations += 1
        if state.global_step == self._last_step:
            # The weights already judged (e.g. eval_on_start right after a resume).
            log.debug("haltpoint: skipped a second evaluation at step %d", state.global_step)
            return
        monitors = [
            self.stopper.monitor if self.stopper else None,
            self.checkpointer.monitor if self.checkpointer else None,
        ]
        values = _measurements(scalar_metrics(metrics or {}), keep=monitors)
        for name in monitors:
            if name is None or name in values:
                continue
            if _PREFIX + name in values:
                values[name] = values[_PREFIX + name]
                continue
            raise missing_metric_error(
                name, values, f"at the evaluation at global step {state.global_step}", _HINT
            )
        if self.stopper is not None:
            decision = self.stopper.step(values)
            if decision:
                log.info("haltpoint: %s", decision.reason)
                control.should_training_stop = True
        self._save(state, values, model, optimizer, lr_scheduler)

    def _save(
        self, state: Any, metrics: dict[str, float], model: Any, optimizer: Any, scheduler: Any
    ) -> None:
        self._last_step = state.global_step
        if self.checkpointer is not None and state.is_world_process_zero:
            saved = self._state(state, model, optimizer, scheduler)
            self.checkpointer.save(state.global_step, saved, metrics)

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        """Warn when no evaluation ran; restore the best weights when asked."""
        self._training = False
        self._put_back_eval_on_start()
        unchecked = self._evaluations == 0 and not self._resumed_done
        if unchecked and self.stopper is not None and not self.stopper.stopped:
            warnings.warn(
                f"haltpoint: no evaluation ran during train(), so early stopping on "
                f"{self.stopper.monitor!r} was never checked and nothing was saved; check "
                "eval_strategy, eval_steps and the eval_dataset",
                stacklevel=2,
            )
        ckpt = self.checkpointer
        if ckpt is None:
            return
        if state.is_world_process_zero:
            ckpt.wait()
        if (dist := initialized()) is not None:
            dist.barrier()  # the other ranks read what the main process wrote
        if self.restore_best and model is not None and ckpt.list():
            self.best_step = restore_best_weights(ckpt, model, self.stopper)
            log.info("haltpoint: restored the best weights, from step %d", self.best_step)


def _measurements(values: dict[str, float], keep: list[str | None]) -> dict[str, float]:
    """`values` without the Trainer's bookkeeping (`epoch`, `eval_runtime`, `*_per_second`...),
    which are no measurements of the model; a monitored name is kept whatever it is.

    >>> _measurements({"eval_loss": 0.5, "eval_runtime": 0.1, "epoch": 2.0}, keep=[None])
    {'eval_loss': 0.5}
    """
    return {
        name: value
        for name, value in values.items()
        if name in keep or not (name in _BOOKKEEPING_NAMES or name.endswith(_BOOKKEEPING_ENDS))
    }


def _position(saved: dict[str, Any], step: int, directory: str) -> tuple[int, float]:
    """The Trainer's global step and epoch that the checkpoint of `step` restored into
    `saved["trainer"]`, checked: the callback saves each step under its global step, with
    the epoch a float >= 0 (a crafted manifest could hold anything there, its checksum valid).

    Raises:
        CorruptCheckpointError: the entry is not the position the callback saved.
    """
    position = saved.get("trainer")
    fields = position if isinstance(position, dict) else {}
    global_step, epoch = fields.get("global_step"), fields.get("epoch")
    if (
        type(global_step) is not int
        or global_step != step
        or type(epoch) is not float
        or not (math.isfinite(epoch) and epoch >= 0)
    ):
        raise CorruptCheckpointError(
            f"the checkpoint of step {step} in {directory} records the Trainer's position as "
            f"{short_repr(position, 200)}, not the global step {step} and an epoch (a float "
            ">= 0) that HaltpointCallback saves: the manifest was altered or written by other "
            "code; resume from another step, or a new directory",
            path=directory,
        )
    return global_step, float(epoch)


def _restore_trainer_best(args: Any, state: Any) -> None:
    """Give a resumed `state` the Trainer's record of its best checkpoint, as its own
    `resume_from_checkpoint` does, from the `trainer_state.json` of its newest checkpoint in
    `output_dir` at or before the restored global step.

    Without it `load_best_model_at_end` loads nothing at the end of a resumed run (a finished
    run, run again, ended with its last weights where the first run ended with the best), or
    only the best of the evaluations since the resume.
    """
    if state.best_model_checkpoint is not None or not os.path.isdir(args.output_dir):
        return
    pattern = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-([0-9]{{1,19}})")  # not \d: any script's
    steps = []
    for name in os.listdir(args.output_dir):
        match = pattern.fullmatch(name)
        if match and int(match[1]) <= state.global_step:
            steps.append(int(match[1]))
    inside = os.path.join(os.path.realpath(args.output_dir), "")
    for step in sorted(steps, reverse=True):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        saved = _read_trainer_state(os.path.join(folder, "trainer_state.json"))
        if saved is None:
            continue  # no state there (a folder being written, or removed): an older one
        best = saved.best_model_checkpoint
        metric, best_step = saved.best_metric, getattr(saved, "best_global_step", None)
        if (  # the Trainer's own checkpoint: a folder in output_dir, never one elsewhere
            isinstance(best, str)
            and os.path.realpath(best).startswith(inside)
            and os.path.isdir(best)
            and (metric is None or type(metric) in (int, float))  # compared with each metric
            and (best_step is None or type(best_step) is int)
        ):
            state.best_model_checkpoint, state.best_metric = best, saved.best_metric
            if hasattr(saved, "best_global_step"):
                state.best_global_step = saved.best_global_step
        return


_STATE_LIMIT = 64 << 20
"""The most of a `trainer_state.json` read (its log history grows by ~200 bytes a log)."""


def _read_trainer_state(path: str) -> Any:
    """The `TrainerState` saved at `path`, or None when there is none that reads: missing, no
    regular file (a FIFO is never waited on), over 64 MiB, not JSON (nesting beyond the
    parser's stack included), or not the fields of this Trainer's version."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            data = f.read(_STATE_LIMIT + 1)
        if len(data) > _STATE_LIMIT:
            return None
        fields = json.loads(data.decode("utf-8"))
        return TrainerState(**fields) if isinstance(fields, dict) else None
    except (OSError, CheckpointError, ValueError, TypeError, RecursionError):
        return None  # TypeError: keys of another version


def _hold(objects: list[Any]) -> Callable[[], None]:
    """A copy, on the CPU, of each object's `state_dict()`, and of the random state; the
    result loads them back."""

    def copied(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return type(value)((k, copied(v)) for k, v in value.items())
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
            return type(value)(*(copied(v) for v in value))
        if isinstance(value, (list, tuple)):
            return type(value)(copied(v) for v in value)
        return value

    held = [(obj, copied(obj.state_dict())) for obj in objects]
    put_back_rng = snapshot_rng()

    def put_back() -> None:
        for obj, saved in held:
            obj.load_state_dict(saved)
        put_back_rng()

    return put_back


def _skip_evaluate_save_log(control: Any) -> None:
    """Cancel the evaluation, save and log the Trainer's flow planned for this step or epoch."""
    control.should_evaluate = control.should_save = control.should_log = False


def _check_replicated(args: Any) -> None:
    """Refuse FSDP and DeepSpeed: the callback saves from the main process only.

    Under them the main process holds a shard, and gathering the full state waits for the
    other processes, so saving there alone would lose state or hang.
    """
    sharding = [name for name in ("fsdp", "deepspeed") if getattr(args, name, None)]
    if sharding:
        raise ValueError(
            f"HaltpointCallback with a checkpointer supports training that replicates the "
            f"model (one device, DDP), not TrainingArguments({sharding[0]}=...): it saves from "
            "the main process only. For FSDP2, save with haltpoint's Checkpointer on every rank "
            "in your own loop (docs/distributed.md, 'Sharded state'), or pass checkpointer=None "
            "to only stop early"
        )
