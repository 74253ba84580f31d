"""Where each rank sits: world rank <-> (pipeline, data, tensor) coordinates, as Megatron-LM.

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank          world = pp * dp * tp

Tensor-parallel ranks vary fastest, so a tensor-parallel group is a run of consecutive
ranks: one node, the fastest links (its all-reduces run inside every layer, forward and
backward). Data-parallel ranks come next (one all-reduce per step, hidden behind the
backward pass); pipeline stages are outermost (point-to-point sends of activations, the
lightest traffic). This is Megatron-LM's default order (``"tp-dp-pp"``, tensor fastest;
`megatron/core/parallel_state.py`), and its docstring's example holds here too: 16 ranks,
tp=2, pp=4, so dp=2:

    tensor groups    [0, 1] [2, 3] [4, 5] ... [14, 15]
    data groups      [0, 2] [1, 3] [4, 6] [5, 7] ... [13, 15]
    pipeline groups  [0, 4, 8, 12] [1, 5, 9, 13] [2, 6, 10, 14] [3, 7, 11, 15]

Pure arithmetic, no MPI: `comm.init_parallel` turns it into communicators with ``Split``
(colour = the index of the rank's group, key = its rank inside the group).
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("tp", "dp", "pp")


@dataclass(frozen=True)
class Layout:
    """``world`` ranks cut into ``pp`` pipeline stages x ``dp`` replicas x ``tp`` shards."""
    world: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        for name in ("world", "tp", "pp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Layout: {name} must be an integer >= 1, got {v!r}")
        if self.world % (self.tp * self.pp):
            raise ValueError(f"Layout: {self.world} ranks cannot be cut into tp={self.tp} x "
                             f"pp={self.pp} = {self.tp * self.pp} ranks per data-parallel "
                             f"replica; launch a multiple of {self.tp * self.pp} ranks")

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def coords(self, rank: int) -> dict:
        """{"pp": pipeline stage, "dp": replica, "tp": shard} of a world rank."""
        if not 0 <= rank < self.world:
            raise ValueError(f"Layout: rank {rank} is outside a world of {self.world}")
        return {"pp": rank // (self.dp * self.tp), "dp": rank // self.tp % self.dp,
                "tp": rank % self.tp}

    def rank(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def group(self, kind: str, rank: int) -> list:
        """The world ranks of ``rank``'s group of ``kind`` ("tp", "dp" or "pp"), in group-rank
        order: the others keep their coordinates, ``kind``'s runs over its whole range."""
        if kind not in KINDS:
            raise ValueError(f"Layout: group kind must be one of {KINDS}, got {kind!r}")
        c = self.coords(rank)
        return [self.rank(**{**c, kind: i}) for i in range(getattr(self, kind))]

    def color(self, kind: str, rank: int) -> int:
        """Which group of ``kind`` ``rank`` is in (the colour MPI's Split needs; the key is the
        rank's own coordinate): the other two coordinates, as one number. Groups are numbered
        in the order of their smallest member, as `groups` lists them."""
        c = self.coords(rank)
        if kind == "tp":
            return c["pp"] * self.dp + c["dp"]
        if kind == "dp":
            return c["pp"] * self.tp + c["tp"]
        if kind == "pp":
            return c["dp"] * self.tp + c["tp"]
        raise ValueError(f"Layout: group kind must be one of {KINDS}, got {kind!r}")

    def groups(self, kind: str) -> list:
        """Every group of ``kind``, each a list of world ranks."""
        seen, out = set(), []
        for r in range(self.world):
            g = self.group(kind, r)
            if g[0] not in seen:
                seen.add(g[0])
                out.append(g)
        return out
