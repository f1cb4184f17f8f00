"""Helpers for property-testing your own agents' crash and replay behaviour.

- :func:`check_crash_replay`: crash an agent after chosen steps, resume it, and compare
  with an uncrashed run; counts every tool-body run by idempotency key.
- :func:`crash_points`: a hypothesis strategy of crash points.
- :class:`perdure.Replayer` (re-exported here): check recorded histories against your
  current agent definitions, calling nothing — for golden-history tests before a deploy.
"""

from perdure.drift import Replayer as Replayer
from perdure.testing.replay import ReplayCheck as ReplayCheck
from perdure.testing.replay import check_crash_replay as check_crash_replay
from perdure.testing.replay import crash_points as crash_points

__all__ = ["ReplayCheck", "Replayer", "check_crash_replay", "crash_points"]
