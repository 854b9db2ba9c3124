"""When speculation pays: the adaptive switch-off. No torch.

Speculation costs a wider step (k + 1 query tokens per sequence) and, with async scheduling, the overlap
of host and device (a proposer needs the latest tokens on the host). It pays when enough drafted tokens
are accepted. The switch measures the accepted share over a window of speculative steps; below
`min_acceptance_rate` it turns speculation off for `backoff_steps` steps, then probes again with one
window; each failed probe doubles the pause (up to max_backoff_steps), a good window resets it. So a
workload that never accepts spends about window / backoff of its steps verifying, and almost none once
the pause has grown. Until a window has been good (at start, and after each failed one) only
`probe_max_seqs` sequences draft in a step (`probe_limit`), so a probe on a big batch costs little. Above
`disable_by_batch_size` running sequences it is off for that step.
"""

from __future__ import annotations

from engine.spec.config import SpeculativeConfig


class SpecSwitch:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.backoff = config.backoff_steps
        self.paused_steps = 0  # steps left before the next probe
        self._window_steps = 0
        self._window_drafted = 0
        self._window_accepted = 0
        self.num_switch_offs = 0  # since start, for tests and the benchmark
        # A window was good since the last failed one (always, when the switch is off): every sequence drafts.
        self.proven = config.min_acceptance_rate <= 0.0

    def on(self, num_running: int) -> bool:
        """Whether this step may speculate (called once per step)."""
        limit = self.config.disable_by_batch_size
        if limit is not None and num_running > limit:
            return False
        return self.paused_steps == 0

    def probe_limit(self) -> int | None:
        """How many sequences may draft this step (None: all)."""
        return None if self.proven else self.config.probe_max_seqs

    def tick(self) -> None:
        """One step passed without speculation while paused."""
        if self.paused_steps > 0:
            self.paused_steps -= 1

    def record(self, drafted: int, accepted: int) -> None:
        """A speculative step verified `drafted` tokens and accepted `accepted` of them."""
        if drafted == 0 or self.config.min_acceptance_rate <= 0.0:
            return
        self._window_steps += 1
        self._window_drafted += drafted
        self._window_accepted += accepted
        if self._window_steps < self.config.window_steps:
            return
        rate = self._window_accepted / self._window_drafted
        self._window_steps = self._window_drafted = self._window_accepted = 0
        if rate >= self.config.min_acceptance_rate:
            self.backoff = self.config.backoff_steps
            self.proven = True
            return
        self.proven = False
        self.paused_steps = self.backoff
        self.backoff = min(self.backoff * 2, self.config.max_backoff_steps)
        self.num_switch_offs += 1
