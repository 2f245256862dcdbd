"""Exclusive groups: of the promotions in scope sharing a non-empty
``exclusive_group``, exactly one applies (RULESET.md "promotions").

Groups are decided in name order; each candidate is evaluated as if the
whole pipeline ran with it (the promotions without a group, the groups
already decided, and the candidate), and the one saving the customer the
most fen wins, then the most bonus points, then the smallest id.

``choose_reference`` says exactly that, with a full run per candidate.
``choose`` gives the same picks by recomputing, for each candidate, only the
lines whose net differs from the run without it; the property tests hold it
to the reference.
"""

from __future__ import annotations

from bisect import bisect_left

from gateway.core.promotions import Pricer, Promo


def _groups(pricer: Pricer) -> tuple[list[Promo], list[list[Promo]]]:
    """(promotions without a group, each group's candidates by id, groups in name order)."""
    plain = [p for p in pricer.promos if not p.group]
    groups: dict[str, list[Promo]] = {}
    for p in pricer.promos:
        if p.group:
            groups.setdefault(p.group, []).append(p)
    return plain, [sorted(groups[g], key=lambda p: p.id) for g in sorted(groups)]


def _best(candidates: list[Promo], score) -> Promo:
    """The candidate with the highest (saving, bonus); the first (smallest id) of equals."""
    best, best_score = candidates[0], None
    for c in candidates:
        s = score(c)
        if best_score is None or s > best_score:
            best, best_score = c, s
    return best


def choose_reference(pricer: Pricer) -> list[Promo]:
    """Each group's pick, by a full run of the pipeline for every candidate."""
    plain, groups = _groups(pricer)
    chosen: list[Promo] = []
    for candidates in groups:
        decided = plain + chosen
        chosen.append(_best(candidates, lambda c: pricer.saving(decided + [c])))
    return chosen


class Base:
    """A run of the decided promotions (in order of application) kept for
    evaluating candidates against it: the nets before each promotion that
    needs them (``snaps``, see Promo.snap), the final nets, the bonus."""

    def __init__(self, pricer: Pricer, active: list[Promo], snaps: list | None = None,
                 final: list[int] | None = None, bonus: int | None = None):
        self.pricer, self.active = pricer, active
        self.keys = [p.key for p in active]
        if final is None:
            snaps = []
            run = pricer.run(active, snapshots=snaps)
            final, bonus = run.nets, run.bonus
        self.snaps, self.final, self.bonus = snaps, final, bonus
        self.saving = sum(pricer.start) - sum(final)
        # The kept runs (with_candidate's answer with ``keep``) of candidates
        # that changed most lines themselves: the next base if one is picked.
        self.kept: dict[Promo, tuple] = {}

    def with_candidate(self, c: Promo, keep: bool = False) -> tuple[tuple[int, int], list[int] | None, list | None]:
        """((saving, bonus) of this base plus ``c``, as a full run gives them,
        and with ``keep`` the final nets and the snapshots of a run with ``c``
        from ``c`` on).

        A line's net changes only where a promotion applies to it: lines
        that differ from the base run ("dirty") are carried through the
        promotions after ``c``; clean lines are read from the snapshots. A
        threshold couples its lines (allocation), so it is recomputed when
        one of its lines is dirty, after which each of its lines is dirty or
        clean again by comparison with the base run. Once most lines are
        dirty, every line is carried through a plain run instead; when that
        is from ``c`` on, the run is kept (``kept``) whatever ``keep`` says:
        it costs little more than the run, and ``plus`` reuses it."""
        pos = bisect_left(self.keys, c.key)
        active, snaps, final = self.active, self.snaps, self.final
        n_act = len(active)
        before = snaps[pos] if pos < n_act else final
        state = before[:]
        new_snaps = [state[:] if c.snap else None] if keep else None
        bonus = self.bonus
        if c.kind == "points_multiplier":
            bonus += c.bonus(state)
            dirty: set[int] = set()
        else:
            c.apply(state)
            dirty = {i for i in c.lines if state[i] != before[i]}
            if 2 * len(dirty) >= len(state):
                if new_snaps is None:
                    new_snaps = [before[:] if c.snap else None]
                self.kept[c] = self._carry(pos, state, bonus, new_snaps)
                return self.kept[c]
        whole_from = n_act  # where every line is carried, if that happens
        for k in range(pos, n_act):
            p = active[k]
            if keep:
                snap = snaps[k]
                if snap is not None:
                    snap = snap[:]
                    for i in dirty:
                        snap[i] = state[i]
                new_snaps.append(snap)
            elif not dirty:
                break  # every line is as in the base run: so is the rest
            if p.line_set.isdisjoint(dirty):
                continue  # every line of p is as in the base run: so is its result
            if p.kind == "threshold":
                snap = snaps[k]
                for i in p.lines:
                    if i not in dirty:
                        state[i] = snap[i]
                p.apply(state)
                after = snaps[k + 1] if k + 1 < n_act else final
                for i in p.lines:
                    if state[i] != after[i]:
                        dirty.add(i)
                    else:
                        dirty.discard(i)
                if 2 * len(dirty) >= len(state):
                    for i in range(len(state)):
                        if i not in dirty:
                            state[i] = after[i]
                    whole_from = k + 1
                    break
            elif p.kind == "points_multiplier":
                snap = snaps[k]
                bonus += sum([state[i] - snap[i] for i in p.lines if i in dirty]) * p.rule.extra
            else:
                p.apply(state)  # clean lines of p get stale values: never read
        if whole_from == n_act:
            saving = self.saving + sum([final[i] - state[i] for i in dirty])
            if not keep:
                return (saving, bonus), None, None
            new_final = final[:]
            for i in dirty:
                new_final[i] = state[i]
            return (saving, bonus), new_final, new_snaps
        return self._carry(whole_from, state, bonus, new_snaps)

    def _carry(self, start: int, state: list[int], bonus: int, new_snaps: list | None):
        """The rest of ``with_candidate`` once every line is carried: a plain
        run of the base's promotions from the ``start``-th, every line of ``state``
        as it truly is before it."""
        active, snaps = self.active, self.snaps
        for k in range(start, len(active)):
            p = active[k]
            if new_snaps is not None:
                new_snaps.append(state[:] if p.snap else None)
            if p.kind == "points_multiplier":
                bonus += p.bonus(state) - p.bonus(snaps[k])
            else:
                p.apply(state)
        return (sum(self.pricer.start) - sum(state), bonus), state, new_snaps

    def score(self, c: Promo) -> tuple[int, int]:
        return self.with_candidate(c)[0]

    def plus(self, c: Promo) -> "Base":
        """The base with ``c`` decided."""
        pos = bisect_left(self.keys, c.key)
        active = self.active[:pos] + [c] + self.active[pos:]
        (_, bonus), final, new_snaps = self.kept.get(c) or self.with_candidate(c, keep=True)
        return Base(self.pricer, active, self.snaps[:pos] + new_snaps, final, bonus)


def choose(pricer: Pricer) -> list[Promo]:
    """Each group's pick, as ``choose_reference`` gives it, evaluating only what each candidate changes."""
    plain, groups = _groups(pricer)
    # Past the last group with a real choice, groups have one candidate each and need no evaluation.
    last_choice = max((j for j, g in enumerate(groups) if len(g) > 1), default=-1)
    if last_choice < 0:
        return [g[0] for g in groups]
    base = Base(pricer, plain)
    chosen: list[Promo] = []
    for j, candidates in enumerate(groups):
        best = _best(candidates, base.score) if len(candidates) > 1 else candidates[0]
        chosen.append(best)
        if j < last_choice:
            base = base.plus(best)
    return chosen
