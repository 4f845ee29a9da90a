"""Beam's per-pipeline introspection, memoized for the in-process jobs of the test session.

``apache_beam.transforms.userstate.get_dofn_specs`` runs ``inspect.signature`` on every method of a
DoFn, and Beam calls it again and again for the same instances while it builds, translates and runs
a pipeline (is it stateful? validate it, its timers): ~1,200 calls and ~1.4 s of CPU for one small
index job on the 2-core Intel VM (cProfile), against ~0.1 s to answer once per DoFn. The suite runs
a few hundred such jobs in its own processes. The answer for an instance does not change (its
state and timer specs are its methods' default arguments), so it is kept per live instance; a
DoFn Beam copies or unpickles is a new instance and asked afresh. Only the tests' processes get
this: the jobs' subprocesses and workers (the CLI and runner tests) run Beam as users do.
"""

from __future__ import annotations

import weakref


def memoize_dofn_specs() -> None:
    from apache_beam.transforms import userstate

    if getattr(userstate.get_dofn_specs, "memoized", False):
        return
    compute = userstate.get_dofn_specs
    cache: dict[int, tuple[weakref.ref, frozenset, frozenset]] = {}

    def get_dofn_specs(dofn):
        hit = cache.get(id(dofn))
        if hit is not None and hit[0]() is dofn:
            return set(hit[1]), set(hit[2])
        states, timers = compute(dofn)  # raises for a malformed DoFn each time, as Beam does
        try:
            ref = weakref.ref(dofn, lambda _, key=id(dofn): cache.pop(key, None))
        except TypeError:  # not weak-referenceable: not kept
            return states, timers
        cache[id(dofn)] = (ref, frozenset(states), frozenset(timers))
        return states, timers

    get_dofn_specs.memoized = True
    get_dofn_specs.computed = compute
    # is_stateful_dofn and validate_stateful_dofn look the name up in the module, and the callers on the
    # FnApiRunner's path (core, runners.common, direct_runner) call it as userstate.get_dofn_specs
    userstate.get_dofn_specs = get_dofn_specs
