"""The Pruner: saliency tracking, selection, weight update, surgery and the prune log, for one model.

Training loop::

    pruner = Pruner(model, PruningConfig(), optimizer=optimizer)     # model: the unwrapped EfficientLLMForCausalLM
    ...
    loss.backward()                     # (DDP has all-reduced the gradients; GradScaler: after unscale_)
    pruner.update_saliency()            # every optimizer step, before optimizer.step()
    optimizer.step()
    if prune_step:
        records = pruner.prune_to(schedule.budget(tokens), step=step, tokens=tokens, batch=input_ids)
        # after any surgery a DDP wrapper must be rebuilt (the trainer does it)

Records (one per removed group) hold step, tokens, type ("attention" | "ffn" | "stem"), layer
(None for stem), index (in the source model's numbering, stable over a run), size (parameters
removed), saliency, density, params_after, plus ``indices`` (every original unit index of the
group; more than one at granularity > 1) and ``floor_hit`` (the call stopped at the floors above
its budget). ``pruner.log`` keeps all of them and is part of ``state_dict()``.

Resume: build the model from the checkpoint (pruned shapes), then ``Pruner(model, cfg, optimizer)``
and ``load_state_dict``; the EMAs, the original-index maps, the step counter and the log come back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch.distributed as dist

from ..model.params import count_parameters
from .config import PruningConfig
from .groups import Group, GroupType, IndexMaps, ModelShapes, enumerate_groups, floor_shapes
from .obs import obs_update
from .saliency import SaliencyTracker
from .selection import Choice, Selection, select_groups
from .surgery import Removal, apply_surgery

log = logging.getLogger(__name__)

STATE_FORMAT = 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Pruner:
    def __init__(self, model, config: PruningConfig | None = None, optimizer=None, mode: str = "ema"):
        self.model = model
        self.config = config or PruningConfig()
        self.optimizer = optimizer
        self.tracker = SaliencyTracker(model, beta=self.config.ema_beta, mode=mode, fisher=self.config.fisher)
        self.maps = IndexMaps.identity(self.shapes())
        self.log: list[dict] = []
        self.floor_hit = False
        self._warned: set[str] = set()

    # ---- views ----------------------------------------------------------------------------------
    def shapes(self) -> ModelShapes:
        return ModelShapes.from_config(self.model.config)

    def num_params(self) -> int:
        return count_parameters(self.model.config).total

    def min_params(self) -> int:
        """The smallest parameter count the floors (and hard guards) allow from the current model."""
        return floor_shapes(self.shapes(), self.config).total()

    def largest_group_size(self) -> int:
        return self.shapes().largest_group_size(self.config.granularity)

    def groups(self) -> list[Group]:
        """Every minimal unit with its size and original index (see ``groups.enumerate_groups``)."""
        return enumerate_groups(self.model.config, self.maps)

    def scores(self) -> dict:
        """Current saliency per unit (float64 numpy): ``attention``/``ffn`` per layer, ``stem``."""
        return self.tracker.scores(self.config.taylor_order)

    @property
    def steps(self) -> int:
        """Saliency updates folded in so far."""
        return self.tracker.count

    # ---- training-time calls --------------------------------------------------------------------
    def update_saliency(self, tokens: int | None = None) -> bool:
        """Fold the current gradients into the EMAs (call after backward, before optimizer.step).

        ``tokens``: the tokens this gradient averages over, all micro-batches and ranks together;
        by default counted from the model's training forwards since the last call.
        """
        return self.tracker.update(tokens)

    def reset_saliency(self, mode: str = "mean") -> None:
        """Start the saliency statistics afresh (a one-shot or staged schedule's calibration pass)."""
        self.tracker.reset(mode)

    def close(self) -> None:
        """Detach from the model (removes the token-counting hook); the Pruner is unusable afterwards."""
        self.tracker.close()

    def select(self, budget_params: int, exact: bool = False) -> Selection:
        """What ``prune_to`` would remove, without touching the model."""
        return select_groups(self.shapes(), self.scores(), int(budget_params), self.config, exact=exact)

    def prune_to(
        self, budget_params: int, step: int | None = None, tokens: int | None = None, batch=None, exact: bool = False
    ) -> list[dict]:
        """Remove lowest-density groups until the parameter count is <= ``budget_params``.

        ``exact``: this budget is the final target; land within the smallest group of it (see
        ``selection.select_groups``).

        Stops early (``self.floor_hit``, a warning, ``floor_hit`` in the records) when floors stop
        it; never raises for that. ``batch`` ([B, T] token ids) is used only by weight_update="obs".
        """
        if self.num_params() <= budget_params:
            return []
        if self.tracker.count == 0:
            self._warn_once("nosal", "pruning before any update_saliency(): groups are chosen without saliency")
        selection = self.select(budget_params, exact=exact)
        if _distributed():
            box = [selection]
            dist.broadcast_object_list(box, src=0)  # belt and braces: the saliency is already identical
            selection = box[0]
        if selection.floor_hit:
            self.floor_hit = True
            self._warn_once(
                "floor",
                f"pruning floors reached at {selection.params_after:,} parameters, above the budget "
                f"{int(budget_params):,}; the floors allow {self.min_params():,} at least",
            )
        return self._execute(selection.choices, step, tokens, batch, selection.floor_hit)

    def remove_groups(
        self, groups: Iterable, step: int | None = None, tokens: int | None = None, batch=None
    ) -> list[dict]:
        """Remove the given units now, whatever their saliency (floors do not apply; notebooks, tests).

        ``groups``: ``Group`` objects or (type, layer, index) tuples with the index in the current
        model's numbering (layer None for stem).
        """
        shapes = self.shapes()
        scores = self.scores()
        choices, seen = [], set()
        params = shapes.total()
        for g in groups:
            kind, layer, index = (g.type, g.layer, g.index) if isinstance(g, Group) else g
            kind = GroupType(kind)
            layer = None if kind == GroupType.STEM else int(layer)
            key = (kind, layer, int(index))
            if key in seen:
                raise ValueError(f"group {key} is listed twice")
            seen.add(key)
            if kind == GroupType.ATTENTION:
                sal = scores["attention"][layer]
            elif kind == GroupType.FFN:
                sal = scores["ffn"][layer]
            else:
                sal = scores["stem"]
            width = len(self.maps.get(kind, layer))
            if not 0 <= index < width:
                raise IndexError(f"{kind.value} index {index} is out of range (width {width})")
            if kind == GroupType.STEM and shapes.hidden == 1:
                raise ValueError("cannot remove every hidden channel: the model would have no residual stream")
            s = float(sal[index])
            if kind == GroupType.FFN and shapes.ffn[layer] == 1:
                s += float(scores["ffn_extra"][layer])
            size = shapes.remove(kind, layer, 1)
            params -= size
            choices.append(Choice(kind, layer, (int(index),), size, s, s / size, params))
        return self._execute(choices, step, tokens, batch, False)

    # ---- the work -------------------------------------------------------------------------------
    def _execute(self, choices: list[Choice], step, tokens, batch, floor_hit: bool) -> list[dict]:
        if not choices:
            return []
        removal = Removal()
        records = []
        for c in choices:
            removal.add(c.type, c.layer, c.positions)
            originals = [int(self.maps.get(c.type, c.layer)[p]) for p in c.positions]
            records.append(
                {
                    "step": step,
                    "tokens": tokens,
                    "type": c.type.value,
                    "layer": c.layer,
                    "index": min(originals),
                    "size": int(c.size),
                    "saliency": float(c.saliency),
                    "density": float(c.density),
                    "params_after": int(c.params_after),
                    "indices": originals,
                    "floor_hit": bool(floor_hit),
                }
            )
        if self.config.weight_update == "obs":
            if batch is None:
                self._warn_once("obsbatch", "weight_update='obs' needs the current batch; plain removal this time")
            else:
                ids = batch["input_ids"] if isinstance(batch, dict) else batch
                obs_update(self.model, removal, ids, self.config.obs_damping)
        kept = apply_surgery(self.model, removal, self.optimizer)
        for layer, keep in kept.attention.items():
            self.tracker.keep(GroupType.ATTENTION, layer, keep)
            self.maps.keep(GroupType.ATTENTION, layer, keep.tolist())
        for layer, keep in kept.ffn.items():
            self.tracker.keep(GroupType.FFN, layer, keep)
            self.maps.keep(GroupType.FFN, layer, keep.tolist())
        if kept.stem is not None:
            self.tracker.keep(GroupType.STEM, None, kept.stem)
            self.maps.keep(GroupType.STEM, None, kept.stem.tolist())
        actual = self.num_params()
        if actual != records[-1]["params_after"]:  # the closed-form sizes disagree with the model: a bug
            log.warning(
                "pruning bookkeeping: expected %d parameters, the model has %d", records[-1]["params_after"], actual
            )
            records[-1]["params_after"] = actual
        self.log.extend(records)
        return records

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "config": self.config.as_dict(),
            "tracker": self.tracker.state_dict(),
            "maps": self.maps.state_dict(),
            "log": [dict(r) for r in self.log],
            "floor_hit": self.floor_hit,
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"pruner state format {sd.get('format')!r} is not {STATE_FORMAT}")
        maps = IndexMaps.from_state_dict(sd["maps"])
        if not maps.matches(self.shapes()):
            raise ValueError(
                "the pruner state does not match the model's shapes; build the model from the same checkpoint "
                "(its config holds the pruned shapes) before loading the pruner state"
            )
        self.tracker.load_state_dict(sd["tracker"])
        self.maps = maps
        self.log = [dict(r) for r in sd.get("log", [])]
        self.floor_hit = bool(sd.get("floor_hit", False))
        if sd.get("config") and sd["config"] != self.config.as_dict():
            log.info("pruner config differs from the checkpoint's: %s vs %s", self.config.as_dict(), sd["config"])


def zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


__all__ = ["Pruner", "zero_grads"]
