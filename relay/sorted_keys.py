"""A persistent sorted set: adding or removing a key makes a new set in O(log n) and
leaves the old one as it was (a treap that copies only the path it changes)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar


class _Comparable(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


K = TypeVar("K", bound=_Comparable)


class _Node(Generic[K]):
    __slots__ = ("key", "left", "priority", "right")

    def __init__(
        self, key: K, priority: int, left: _Node[K] | None, right: _Node[K] | None
    ) -> None:
        self.key = key
        self.priority = priority
        self.left = left
        self.right = right


class SortedKeys(Generic[K]):
    """An immutable sorted set of distinct keys with the largest at hand.

    Each key's place in the tree is drawn from its hash, so the tree is balanced in
    expectation whatever order keys come in; every change copies one root-to-leaf path.
    """

    __slots__ = ("_root", "_size")

    def __init__(self, root: _Node[K] | None = None, size: int = 0) -> None:
        self._root = root
        self._size = size

    @classmethod
    def of(cls, keys: Iterable[K]) -> SortedKeys[K]:
        """The set of `keys`, built in one pass once they are sorted (a Cartesian tree:
        the same heap of priorities that adding them one by one makes)."""
        ordered = sorted(set(keys))
        stack: list[_Node[K]] = []  # the right spine, highest priority first
        for key in ordered:
            node = _Node(key, hash(key), None, None)
            below = None
            while stack and stack[-1].priority < node.priority:
                below = stack.pop()
            node.left = below
            if stack:
                stack[-1].right = node
            stack.append(node)
        return cls(stack[0] if stack else None, len(ordered))

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: K) -> bool:
        node = self._root
        while node is not None:
            if key < node.key:
                node = node.left
            elif node.key < key:
                node = node.right
            else:
                return True
        return False

    def __iter__(self) -> Iterator[K]:
        stack: list[_Node[K]] = []
        node = self._root
        while stack or node is not None:
            while node is not None:
                stack.append(node)
                node = node.left
            node = stack.pop()
            yield node.key
            node = node.right

    def max(self) -> K | None:
        """The largest key; None when empty."""
        node = self._root
        if node is None:
            return None
        while node.right is not None:
            node = node.right
        return node.key

    def add(self, key: K) -> SortedKeys[K]:
        if key in self:
            return self
        return SortedKeys(_insert(self._root, key, hash(key)), self._size + 1)

    def remove(self, key: K) -> SortedKeys[K]:
        if key not in self:
            return self
        return SortedKeys(_remove(self._root, key), self._size - 1)


def _insert(node: _Node[K] | None, key: K, priority: int) -> _Node[K]:
    if node is None:
        return _Node(key, priority, None, None)
    if priority > node.priority:
        left, right = _split(node, key)
        return _Node(key, priority, left, right)
    if key < node.key:
        return _Node(node.key, node.priority, _insert(node.left, key, priority), node.right)
    return _Node(node.key, node.priority, node.left, _insert(node.right, key, priority))


def _split(node: _Node[K] | None, key: K) -> tuple[_Node[K] | None, _Node[K] | None]:
    """The keys below `key` and those above it (`key` itself is not in the tree)."""
    if node is None:
        return None, None
    if node.key < key:
        left, right = _split(node.right, key)
        return _Node(node.key, node.priority, node.left, left), right
    left, right = _split(node.left, key)
    return left, _Node(node.key, node.priority, right, node.right)


def _merge(low: _Node[K] | None, high: _Node[K] | None) -> _Node[K] | None:
    """One tree of two whose keys are all below (`low`) and above (`high`) each other."""
    if low is None:
        return high
    if high is None:
        return low
    if low.priority > high.priority:
        return _Node(low.key, low.priority, low.left, _merge(low.right, high))
    return _Node(high.key, high.priority, _merge(low, high.left), high.right)


def _remove(node: _Node[K] | None, key: K) -> _Node[K] | None:
    assert node is not None  # the caller checked that the key is there
    if key < node.key:
        return _Node(node.key, node.priority, _remove(node.left, key), node.right)
    if node.key < key:
        return _Node(node.key, node.priority, node.left, _remove(node.right, key))
    return _merge(node.left, node.right)
