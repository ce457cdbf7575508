"""What a writer removes from its run, and the checks that come first.

After every save the `Checkpointer` hands the run's committed checkpoints to its `Evictor`:
retention removes what no rule keeps, but only once every checkpoint kept in the place of a
removed one has been verified (a damaged one is set aside and the rules run again, so a
damaged checkpoint never costs an intact one); a re-saved step's older tensor file goes only
after the new one verifies. Nothing here decides what to keep: `haltpoint.policies.retention`
does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from haltpoint.errors import CheckpointError, LockedError, UnreadableCheckpointError, first_line
from haltpoint.policies.retention import (
    KeepBest,
    RetentionRule,
    contested_steps,
    recorded_best_rules,
    retained_steps,
)
from haltpoint.reader import RunReader
from haltpoint.store.background import warn_user
from haltpoint.store.manifest import recorded_rankings
from haltpoint.store.run_dir import TENSORS_NAME, Entry, RunDirectory

__all__ = ["Evictor"]


class Evictor:
    """Removes, for one writer, the checkpoints and files its run no longer needs.

    `intact` holds the steps this writer saved, restored or verified: they are not verified
    again before retention counts them. `held()`, when given (`WriterLock.check`), runs
    before every removal or quarantine move after the writer opened the run, as before a
    commit: a writer whose lock file was deleted or replaced removes nothing, since another
    writer, whose retention may keep it, may hold the run now.
    """

    def __init__(
        self,
        run: RunDirectory,
        reader: RunReader,
        rules: Sequence[RetentionRule],
        monitor: str | None,
        mode: str,
        held: Callable[[], None] | None = None,
    ) -> None:
        self._run = run
        self._held = held
        self._reader = reader
        self._rules = list(rules)
        self._monitor = monitor
        self._mode = mode
        self._directory = run.storage.url
        self.intact: set[int] = set()
        self._said_rankings: set[tuple[str, str]] = set()  # other rankings warned about

    def remove_superseded(self, entry: Entry) -> None:
        """After `entry` was saved under a fresh tensor file name (its folder held an older
        one): verify it, then delete its folder's tensor files that no manifest references.
        An OS error while deleting is a warning: the save is committed."""
        assert entry.manifest is not None
        own = {f for f in entry.manifest.files() if f.startswith(f"{entry.dirname}/")}
        if own <= {f"{entry.dirname}/{TENSORS_NAME}"}:
            return  # the first name: no older file was there
        try:
            damage = self._reader.damage(entry)
        except UnreadableCheckpointError:
            return  # not verified: the older files stay, as they are harmless
        if damage is None and self._still_held(
            f"the superseded tensor file(s) of step {entry.step} stay"
        ):
            try:
                self._run.remove_superseded(entry.dirname)
            # committed: clean-up retries (a CheckpointError: a link planted meanwhile)
            except (OSError, CheckpointError) as exc:
                warn_user(
                    f"{self._directory}: could not remove the superseded tensor file(s) of step "
                    f"{entry.step} ({exc}); the save is committed, and the next writer's "
                    "clean-up removes them"
                )

    def apply_retention(self, entries: list[Entry]) -> None:
        """Remove the committed checkpoints (`entries`: all of them, the one just saved
        included) no rule keeps. keep_last counts in commit order, so after a rewind the old
        run's checkpoints (above the step saved, too) are the oldest, and go first.

        Before anything is removed, every checkpoint that keep_last or keep_best keeps in its
        place is verified (once per writer): a damaged one is quarantined and the rules run
        again, so a damaged checkpoint never costs an intact one.
        """
        rules = [*self._rules, *self._recorded_best(entries)]
        while True:
            records = [self._reader.info(e) for e in entries]
            kept_steps = retained_steps(records, rules)
            dropped = [e for e in entries if e.step not in kept_steps]
            if not dropped:
                return
            contested = contested_steps(records, rules)
            unchecked = [e for e in entries if e.step in contested - self.intact]
            if not unchecked:
                break
            if not self._still_held("retention removed no checkpoint this time"):
                return
            for entry in unchecked:
                try:
                    damage = self._reader.damage(entry)
                except UnreadableCheckpointError as exc:  # not damage: remove nothing
                    warn_user(f"{first_line(exc)}; retention removed no checkpoint this time")
                    return
                if damage is None:
                    self.intact.add(entry.step)
                    continue
                try:
                    self.quarantine(entry, damage)
                # the save is committed: remove nothing this time (a CheckpointError: a link
                # planted at the quarantine folder since the writer opened the run)
                except (OSError, CheckpointError) as exc:
                    warn_user(
                        f"{self._directory}: retention could not set the damaged checkpoint of "
                        f"step {entry.step} aside ({exc}); it removed no checkpoint this time"
                    )
                    return
                entries = [e for e in entries if e.step != entry.step]
        kept = [e.manifest for e in entries if e.step in kept_steps and e.manifest]
        if not self._still_held("retention removed no checkpoint this time"):
            return
        try:
            self._run.remove(dropped, kept)
        # committed: a later pass retries (a CheckpointError: a quarantine folder that cannot
        # be listed, a link planted there since the writer opened the run)
        except (OSError, CheckpointError) as exc:
            steps = ", ".join(str(e.step) for e in dropped)
            warn_user(
                f"{self._directory}: retention could not remove step {steps} ({exc}); the "
                "save is committed, and a later save or `haltpoint gc` removes what is left"
            )
        self.intact -= {e.step for e in dropped if self._run.removed(e.dirname)}

    def _still_held(self, outcome: str) -> bool:
        """Whether this writer still holds the run's lock (`held()`); warns when not, saying
        `outcome` (what was left)."""
        if self._held is None:
            return True
        try:
            self._held()
        except LockedError as exc:
            warn_user(
                f"{self._directory}: {outcome}: the writer lock file "
                f"{exc.path} was deleted or replaced since this writer took it, so another "
                "writer may be using the run and keeping what this one would remove; the "
                "save is committed: stop every other writer of the run, then open it again"
            )
            return False
        return True

    def _recorded_best(self, entries: list[Entry]) -> list[KeepBest]:
        """Keep-best rules for the rankings the run's checkpoints record other than this
        writer's (said once): their best is never evicted by a ranking they were not kept by."""
        recorded = recorded_rankings(e.manifest for e in entries)
        rules = recorded_best_rules(self._rules, recorded)
        said = {(r.monitor, r.mode) for r in rules} - self._said_rankings
        if said:
            self._said_rankings |= said
            theirs = ", ".join(f"{monitor} ({mode})" for monitor, mode in sorted(said))
            warn_user(
                f"{self._directory}: checkpoints there were ranked by {theirs}, this "
                f"Checkpointer ranks by {self._monitor} ({self._mode}); retention keeps the best "
                "by both, so the run's best is not lost (pass the same monitor and mode, or "
                "remove the old ones with haltpoint gc)"
            )
        return rules

    def quarantine(self, entry: Entry, damage: str | None) -> None:
        """Move a damaged checkpoint aside (the writer only), so its step can be saved again;
        `damage` says what is wrong, None when that was already warned about."""
        where = self._run.quarantine(entry)
        self.intact.discard(entry.step)
        said = "" if damage is None else f"{damage}\n"
        warn_user(
            f"{said}haltpoint: set the damaged checkpoint of step {entry.step} aside as "
            f"{self._directory.rstrip('/')}/{where} (its data stays; delete it when you no "
            f"longer need it); step {entry.step} can be saved again"
        )
