"""Drafters that keep what they propose, so a test can compare a framework's drafts with the core's."""

from __future__ import annotations

from v4_plugin.runtime.model import V4Model


def recording(drafter_cls: type) -> type:
    """A subclass of a core drafter (`MTPDrafter`, `DSparkDrafter`) whose `proposed` lists every step's drafts."""

    class Recording(drafter_cls):
        def __init__(self, model: V4Model):
            super().__init__(model)
            self.proposed: list[list[int]] = []

        def propose(self, k: int) -> list[int]:
            self.proposed.append(super().propose(k))
            return self.proposed[-1]

    Recording.__name__ = f"Recording{drafter_cls.__name__}"
    return Recording
