"""How the ranks agree on each checkpoint call, so an error on one is raised on all.

Rank 0 alone takes the writer lock and does the I/O of replicated state; every `Checkpointer`
method a rank 0 error can come out of (`Checkpointer(...)`, `save`, `wait`, `close`,
`restore`, `list`, `pin`, `unpin`) ends with `on_writer`, one `exchange` carrying rank 0's
result or its error. Where every rank acts (finding and writing sharded state, reading and
loading in `restore`), `all_succeed` and `all_results` end with an `exchange` of every rank's
failure. So an error is raised on every rank at the same call and no rank is left waiting in a
collective. Every `exchange` also carries the name of the call each rank is in: ranks at
different calls (their stoppers decided differently) raise on every rank at once instead of
hanging. See docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NoReturn, TypeVar

from haltpoint import errors
from haltpoint.distributed.ranks import Replicas, all_gather, all_max, initialized
from haltpoint.errors import CheckpointError, first_line

__all__ = [
    "OPENING",
    "all_results",
    "all_succeed",
    "exchange",
    "largest",
    "on_writer",
    "refuse_together",
    "restore_agreed",
]

T = TypeVar("T")


def exchange(group: Replicas, what: str, payload: Any) -> list[Any]:
    """Every rank's picklable `payload`, by rank, once every rank is at the same call `what`.

    Each rank sends the name of the call it is in with its payload. Ranks at different calls
    (one closing while another saves, because their stoppers decided differently) would pair
    collectives that do not belong together and hang, or mix up their payloads: instead every
    rank raises the same `CheckpointError`, naming each rank's call and the remedy. A rank
    that died (its process or node killed) fails the collective on the others, within the
    process group's timeout at worst: that too is a `CheckpointError`, naming the call.
    """
    try:
        gathered = all_gather((what, None, payload), group.process_group)
    except RuntimeError as exc:  # gloo / NCCL: a peer closed the connection or timed out
        raise _lost_contact(what, exc) from exc
    _raise_refused(gathered)
    calls = [call for call, _, _ in gathered]
    if any(call != what for call in calls):
        raise CheckpointError(_parted(calls))
    return [item for _, _, item in gathered]


def refuse_together(group: Replicas | None, what: str, exc: Exception) -> NoReturn:
    """Raise `exc`, this rank's refusal of the call `what` by a check of its own before any
    collective (a closed `Checkpointer`, a bad argument), on every rank: it travels in the
    first `exchange` the other ranks are in (whatever call), which raises it there at once,
    instead of leaving them waiting for a rank that never comes. Every rank refused alike
    (the same message): each raises its own `exc`. Without a group, or when the others are
    gone, this rank raises `exc`."""
    if group is None or initialized() is None:
        raise exc
    said = f"{type(exc).__name__}: {exc}"
    try:
        gathered = all_gather((what, (said, _kind(exc)), None), group.process_group)
    except RuntimeError:
        raise exc from None
    if all(refused is not None and refused[0] == said for _, refused, _ in gathered):
        raise exc
    _raise_refused(gathered, exc)
    raise exc  # pragma: no cover - this rank's own refusal is in `gathered`


def _raise_refused(gathered: list[Any], cause: BaseException | None = None) -> None:
    """Raise, on every rank the same, the first refusal (`refuse_together`) in `gathered`."""
    for rank, (call, refused, _) in enumerate(gathered):
        if refused is not None:
            said, kind = refused
            raise getattr(errors, kind)(f"{call} failed on rank {rank}: {said}") from cause


OPENING = "opening "
"""How the call of a `Checkpointer(...)` under a process group begins: `OPENING + directory`."""


def _parted(calls: list[str]) -> str:
    """The message of ranks at different calls: each rank's `call`, and the remedy."""
    if all(call.startswith(OPENING) for call in calls):  # Checkpointer(...) of other paths
        opens = ", ".join(f"rank {r} opens {c[len(OPENING) :]}" for r, c in enumerate(calls))
        return (
            f"the ranks open different run directories ({opens}): every rank must pass the "
            "path of one shared directory (a shared file system or an object store) that "
            "every rank sees (docs/distributed.md)"
        )
    at = ", ".join(f"rank {rank} at {call}" for rank, call in enumerate(calls))
    return (
        f"the ranks are at different haltpoint calls ({at}): every rank must call the same "
        "methods in the same order. A stopper stepped with each rank's own metric stops "
        "the ranks at different epochs: wrap it as synced(EarlyStopping(...)) so that "
        "every rank takes the same decision (docs/distributed.md)"
    )


def largest(group: Replicas, what: str, value: int, buffer: Any = None) -> int:
    """The largest of every rank's `value`, with one all-reduce of one number: for a value
    read at a point every rank reaches in step (`Checkpointer.preempted`), where `exchange`'s
    pickled gather of the call's name would cost more than the answer. Unlike `exchange` it
    cannot tell ranks at different calls apart. A rank that died is a `CheckpointError`.
    `buffer` is `ranks.number_buffer`'s, to reuse (a new one when None)."""
    try:
        return all_max(value, group.process_group, buffer)
    except RuntimeError as exc:
        raise _lost_contact(what, exc) from exc


def _lost_contact(what: str, exc: RuntimeError) -> CheckpointError:
    return CheckpointError(
        f"{what} failed: the ranks lost contact ({type(exc).__name__}: {first_line(exc)}); "
        "a rank or node died, or the network broke"
    )


def _failure(what: str, exc: BaseException) -> tuple[bool, str, str, str | None]:
    """What rank 0 broadcasts when `what` failed: the message, error class (the nearest one
    of `haltpoint.errors`) and path."""
    return False, f"on rank 0, {what} failed: {type(exc).__name__}: {exc}", _kind(exc), _path(exc)


def _kind(exc: BaseException) -> str:
    """The name of the class every rank raises for `exc`: the nearest `CheckpointError`
    class of `haltpoint.errors`, else `CheckpointError`."""
    if not isinstance(exc, CheckpointError):
        return "CheckpointError"
    public = [c for c in type(exc).__mro__ if getattr(errors, c.__name__, None) is c]
    return public[0].__name__


def _path(exc: BaseException) -> str | None:
    path = getattr(exc, "path", None)
    return path if isinstance(path, str) else None


def _raise(failure: tuple[bool, str, str, str | None], cause: BaseException | None) -> None:
    """Raise the same error on every rank: rank 0's `CheckpointError` class, else the base."""
    _, message, kind, path = failure
    raise getattr(errors, kind)(message, path=path) from cause


def on_writer(
    group: Replicas | None,
    fn: Callable[[], T],
    what: str,
    share: Callable[[T], Any] | None = None,
) -> Any:
    """Run `fn` on rank 0 only and agree on the outcome with one `exchange`.

    Without a group this is `fn()`. With one, rank 0 runs `fn` and sends its result
    (through `share`, if given); the other ranks return that. If `fn` fails, every rank
    raises the same error: rank 0's class when it is one of haltpoint's `CheckpointError`s
    (e.g. `CheckpointExistsError`), else `CheckpointError`, with the same message naming the
    original error (on rank 0 chained to it).
    """
    if group is None:
        return fn()
    if not group.is_writer:
        payload = exchange(group, what, None)[0]
        if not payload[0]:
            _raise(payload, None)
        return payload[1]
    try:
        result = fn()
    except Exception as exc:
        failure = _failure(what, exc)
        exchange(group, what, failure)
        _raise(failure, exc)
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: release the others, re-raise
        exchange(group, what, _failure(what, exc))
        raise
    exchange(group, what, (True, result if share is None else share(result)))
    return result


def all_succeed(group: Replicas | None, fn: Callable[[], T], what: str) -> T:
    """Run `fn` on every rank; if it fails on any, raise the same error on all.

    That is an error naming the first rank that failed and its error, of that error's
    `CheckpointError` class (`StateMismatchError`, ...; `CheckpointError` for any other
    error) or, when every rank failed with the same message (a bad argument), each rank's
    own error.
    """
    return _everywhere(group, fn, what, gather=False)[0]


def all_results(group: Replicas | None, fn: Callable[[], T], what: str) -> list[T]:
    """Like `all_succeed`, and every rank gets every rank's (picklable) result, by rank."""
    return _everywhere(group, fn, what, gather=True)


def _everywhere(group: Replicas | None, fn: Callable[[], T], what: str, gather: bool) -> list[T]:
    if group is None:
        return [fn()]
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    message = None if error is None else f"{type(error).__name__}: {error}"
    kind = None if error is None else _kind(error)
    gathered = exchange(group, what, ((message, kind), result if gather else None))
    failed = [rank for rank, ((said, _), _) in enumerate(gathered) if said is not None]
    if error is not None and all(said == message for (said, _), _ in gathered):
        raise error  # the same failure on every rank (a bad argument): keep its type
    if failed:
        said, kind = gathered[failed[0]][0]
        raise getattr(errors, kind)(f"{what} failed on rank {failed[0]}: {said}") from error
    return [value for _, value in gathered] if gather else [result]


def restore_agreed(
    group: Replicas,
    read: Callable[[str | int, dict[int, str]], Any],
    check: Callable[[Any, int, int], str | None],
    prepare: Callable[[Any], Any],
    which: str | int,
) -> Any:
    """Rank 0 chooses the checkpoint; every rank reads that step, the ranks check its other
    files together, every rank checks its state against it, then every rank loads it.

    `read(which, skip)` finds and reads (verifying) a checkpoint: rank 0 calls it to resolve
    `which` ("latest", "best", a step; with its fall-backs over damaged checkpoints, passing
    over the steps in `skip`, which maps them to their damage) and broadcasts the step; the
    other ranks then read that exact step from the shared directory, so all load the same one
    even if the directory changed in between. `check(found, rank, world_size)` checks this
    rank's share of the checkpoint's other files (a sharded checkpoint's DCP files) and says
    what is damaged, or None: every rank reads only its share. Damage found by any rank sends
    rank 0 back to choose past that step (or raises on every rank, for a step or when no
    checkpoint is left). `prepare(found)` checks this rank's state against it (a model that
    does not fit, on one rank only) and returns the plan (`store.info.Planned`): its `load()`,
    and which sharded entries it loads with every rank and which alone; ranks whose plans
    would load the sharded entries differently (one through DCP's collective load, another
    alone or not at all) raise `StateMismatchError`, all of them. Every round and the checks
    end with a collective that carries failures, so every rank enters the load (which may be
    collective: DCP) or none does. Returns None on every rank when rank 0 found no checkpoint.
    """
    what = f"restore({which!r})"
    skip: dict[int, str] = {}
    while True:
        found = _read_agreed(group, read, which, skip, what)
        if found is None:
            return None
        step = found.entry.step
        reports = all_results(
            group,
            partial(check, found, group.rank, group.world_size),
            f"{what}: checking step {step}",
        )
        damage = next((r for r in reports if r is not None), None)
        if damage is None:
            checking = f"{what}: checking the state against step {step}"
            planned: Any = None

            def plan(found: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
                nonlocal planned
                planned = prepare(found)
                return planned.together, planned.alone

            _load_alike(all_results(group, partial(plan, found), checking), what, step)
            return all_succeed(group, planned.load, f"{what}: loading step {step}")
        skip[step] = damage  # rank 0 chooses again, past it, or raises


def _load_alike(plans: list[tuple[tuple[str, ...], tuple[str, ...]]], what: str, step: int) -> None:
    """Raise `StateMismatchError` on every rank when some rank loads sharded entries with
    every rank (DCP's collective load) and another loads other ones, or alone: the first
    would wait in DCP's collectives for a rank that never comes. `plans` are every rank's
    (together, alone) entries, the same on every rank, so every rank raises the same."""
    if not any(together for together, _ in plans) or all(p == plans[0] for p in plans):
        return

    def says(rank: int, together: tuple[str, ...], alone: tuple[str, ...]) -> str:
        kinds = [f"{n!r} sharded (DTensor)" for n in together]
        kinds += [f"{n!r} unsharded" for n in alone]
        return f"rank {rank} restores {' and '.join(kinds) or 'none of the sharded entries'}"

    each = ", ".join(says(rank, *p) for rank, p in enumerate(plans))
    raise errors.StateMismatchError(
        f"{what}: the ranks restore the sharded entries of step {step} differently ({each}): "
        "DCP loads entries holding DTensor shards with every rank at once, so every rank must "
        "pass the same entries, sharded alike (the same state on every rank); nothing was "
        "loaded"
    )


def _read_agreed(
    group: Replicas,
    read: Callable[[str | int, dict[int, str]], Any],
    which: str | int,
    skip: dict[int, str],
    what: str,
) -> Any:
    """Rank 0 resolves and reads `which`; then every other rank reads the step it chose and
    checks that it read the same checkpoint: the manifest's checksum, which rank 0 sends with
    the step (a run directory at the same path on each node's own disk may hold another
    checkpoint of that step, or none)."""
    mine: Any = None

    def choose() -> tuple[int, str] | None:
        nonlocal mine
        mine = read(which, skip)
        return None if mine is None else (mine.entry.step, mine.entry.manifest.checksum)

    chosen = on_writer(group, choose, what)
    if chosen is None:
        return None
    step, checksum = chosen
    if not group.is_writer:
        return all_succeed(
            group, partial(_read_same, group.rank, read, step, checksum), f"{what} of step {step}"
        )
    all_succeed(group, lambda: None, f"{what} of step {step}")
    return mine


def _read_same(
    rank: int, read: Callable[[str | int, dict[int, str]], Any], step: int, checksum: str
) -> Any:
    """Read `step`, the checkpoint rank 0 chose and read (its manifest's `checksum`)."""
    shared = (
        "the ranks must share one run directory (a shared file system or an object store, not "
        "the same path on each node's own disk); nothing was loaded"
    )
    try:
        found = read(step, {})
    except errors.CheckpointNotFoundError as exc:
        raise errors.CheckpointNotFoundError(
            f"rank {rank} finds no checkpoint of step {step}, which rank 0 read ({exc}): {shared}",
            path=exc.path,
        ) from exc
    theirs = found.entry.manifest.checksum
    if theirs != checksum:
        raise CheckpointError(
            f"rank {rank} reads a different checkpoint of step {step} than rank 0 (manifest "
            f"checksum {theirs}, rank 0's {checksum}): {shared}"
        )
    return found
