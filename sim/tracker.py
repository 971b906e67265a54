"""The per-digest tracker of the fan-out policy: who feeds a newcomer.

The ring owner P of a digest keeps its members in join order (P is member 0)
and answers each request with one parent, as the fan-out policy
states:

* the first member in join order whose children so far are fewer than its K,
  skipping the requester, members on its avoid list and its descendants;
* counts are never freed (the tracker sees requests, not transfer ends), so
  the tree is a balanced K-ary tree in join order, depth about log_K(N);
* if every member is full or skipped, P serves the requester itself (fallback);
* the requester joins with its own K when K > 0 and it advertises a URL.

This module is the policy only: no time, no bytes. The simulator asks it in
arrival order; the tests pin its choices.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


@dataclass(eq=False)
class Member:
    name: str
    k: int
    parent: Member | None
    depth: int
    children: int = 0


@dataclass(frozen=True)
class Assignment:
    parent: str
    fallback: bool  # every member was full or skipped: the owner serves anyway


class Tracker:
    """Members of one digest's tree, in join order; the owner is member 0.

    Guarantees: an assignment never names the requester, a member on its avoid
    list, or one of its descendants (so the tree never gets a loop); a member
    is never given more than its K children, except the owner by fallback.
    Amortised O(1) per assignment in a storm (a pointer skips full members).
    """

    def __init__(self, owner: str, owner_k: int) -> None:
        self.owner = Member(owner, owner_k, None, 0)
        self.members: list[Member] = [self.owner]
        self._by_name = {owner: self.owner}
        self._first_open = 0  # every member before it is full, for good
        self.fallbacks = 0

    def assign(
        self, requester: str, k: int, avoid: Collection[str] = (), advertises: bool = True
    ) -> Assignment:
        """Pick the requester's parent and record the requester as its child."""
        me = self._by_name.get(requester)
        chosen = self._first_eligible(requester, me, avoid)
        fallback = chosen is None
        if chosen is None:
            chosen = self.owner
            self.fallbacks += 1
        chosen.children += 1
        if me is not None:
            me.parent, me.depth = chosen, chosen.depth + 1  # a re-request (resume) moves it
        elif k > 0 and advertises:
            self._join(Member(requester, k, chosen, chosen.depth + 1))
        return Assignment(chosen.name, fallback)

    def depth_of(self, name: str) -> int | None:
        member = self._by_name.get(name)
        return None if member is None else member.depth

    def _first_eligible(
        self, requester: str, me: Member | None, avoid: Collection[str]
    ) -> Member | None:
        while self._first_open < len(self.members) and _full(self.members[self._first_open]):
            self._first_open += 1
        for i in range(self._first_open, len(self.members)):  # no slice: O(1) in a storm
            member = self.members[i]
            if _full(member) or member.name == requester or member.name in avoid:
                continue
            if me is not None and _descends_from(member, me):
                continue
            return member
        return None

    def _join(self, member: Member) -> None:
        self.members.append(member)
        self._by_name[member.name] = member


def _full(member: Member) -> bool:
    return member.children >= member.k


def _descends_from(member: Member, ancestor: Member) -> bool:
    node = member.parent
    while node is not None:  # ends: parents form a tree rooted at the owner
        if node is ancestor:
            return True
        node = node.parent
    return False
