"""Channel cuts: splits, chunks and channel slices, and the forward code that fixes their sizes.

A split (``torch.split``, ``Tensor.split``), a chunk or a slice ``x[:, a:b]`` cuts a channel dimension
into parts. Pruning channels of one part changes that part's size, and the sizes live in the
model's *forward code*, not in any tensor: timm's ``MixedConv2d`` splits by its list ``self.splits``,
Res2Net's ``Bottle2neck`` by the int ``self.width``, a ghost module slices by ``self.out_chs``.
torch-pruning resizes the layers but never that code, so a model pruned inside a part would cut
its channels at the old places: at best a shape error, at worst a silently wrong model.

This module makes such parts prunable where the code can be followed, and says why not elsewhere:

* :func:`recording` watches a forward pass (a :class:`~torch.overrides.TorchFunctionMode`) and
  records every channel cut as a :class:`CutSite`: which module's forward made the call, the call's
  arguments and the autograd node it created (which torch-pruning's graph holds too), and the
  *holder*: the attribute of that module the sizes came from (a list attribute passed as is, or
  the one int attribute equal to the size or bound). A chunk has none: its part sizes follow from
  the chunk count, so its parts can only shrink together, which a plan cannot promise.
* :func:`patch_split_mapping` corrects torch-pruning 1.6's split index mapping, which assigns the
  parts to the split's consumers in graph-traversal order (a Res2Net block's first part went to its
  third conv) and, for an int split size, assumes equal parts; here each consumer reads the part
  whose output index autograd records, at that part's offset.
* :func:`apply_cuts` updates each holder after the physical prune (the new part sizes, or bounds)
  and re-runs the model under :func:`recording` to check that every cut now yields exactly the
  sizes the pruned layers expect; anything else raises, so a wrong prune is never returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from autodfp.errors import ModelError

#: functions that cut a tensor into parts along one dimension by sizes
_SPLITS: tuple[Callable[..., Any], ...] = tuple(
    f for f in (torch.split, torch.Tensor.split, getattr(torch.Tensor, "split_with_sizes", None)) if f is not None
)
#: functions that cut by a number of parts
_CHUNKS: tuple[Callable[..., Any], ...] = (torch.chunk, torch.Tensor.chunk)
#: other channel cuts that no holder can describe (recorded so that they stay whole)
_OTHERS: tuple[Callable[..., Any], ...] = tuple(
    f
    for f in (torch.narrow, torch.Tensor.narrow, torch.tensor_split, getattr(torch.Tensor, "tensor_split", None))
    if f is not None
)


@dataclass
class CutSite:
    """One call that cut a channel dimension in a forward pass.

    ``kind`` is ``"split"`` (by sizes), ``"chunk"`` (by count), ``"slice"`` (``x[:, a:b]``) or
    ``"other"`` (narrow, tensor_split). ``sections`` are the parts' channel counts (one, for a
    slice), ``start``/``stop``/``step`` a slice's bounds (clamped to ``width``). ``holder`` names
    the attributes of the module ``owner`` that the sizes came from: for a split, one attribute (a
    list or an int); for a slice, ``("start", attr)`` and/or ``("stop", attr)`` pairs, for the bounds
    that are not already 0 or open. ``key`` (owner, kind and call order) names the same call in
    another forward pass of the same (or the pruned) model.
    """

    key: str
    kind: str
    owner: str
    width: int
    sections: tuple[int, ...]
    start: int = 0
    stop: int = 0
    step: int = 1
    holder: tuple[tuple[str, str], ...] = ()
    #: a slice bound or split size that is neither 0/open nor held by an attribute
    unheld: tuple[str, ...] = ()
    grad_fn: Any = field(default=None, repr=False, compare=False)

    @property
    def patchable(self) -> bool:
        """Whether the parts' sizes can be rewritten after a prune (see the module docstring)."""
        if self.kind == "split":
            return bool(self.holder)
        if self.kind == "slice":
            return self.step == 1 and not self.unheld
        return False

    def describe(self) -> str:
        where = f"'{self.owner}'" if self.owner else "the model's forward"
        if self.kind == "chunk":
            return f"a chunk in {where} (its parts can only shrink together)"
        if self.kind == "other":
            return f"a narrow/tensor_split in {where}"
        what = "a split" if self.kind == "split" else "a slice"
        if self.kind == "slice" and self.step != 1:
            return f"{what} with step {self.step} in {where}"
        return f"{what} in {where} whose sizes no attribute holds"


def _channel_dim(x: torch.Tensor, dim: Any) -> bool:
    """Whether ``dim`` of ``x`` is the channel dimension (1 of an N, C, ... tensor)."""
    if not isinstance(dim, int) or x.dim() < 2:
        return False
    return (dim + x.dim() if dim < 0 else dim) == 1


def _int_attrs(module: nn.Module, value: int) -> list[str]:
    """Instance attributes of ``module`` that are ints (not bools) equal to ``value``."""
    return [k for k, v in vars(module).items() if type(v) is int and v == value]


def _list_holder(module: nn.Module, value: Sequence[int]) -> list[str]:
    """The attribute a size list came from: the very object if one holds it, else equal lists."""
    same = [k for k, v in vars(module).items() if v is value]
    if same:
        return same
    return [k for k, v in vars(module).items() if isinstance(v, (list, tuple)) and list(v) == list(value)]


class _Recorder(TorchFunctionMode):
    """Records every channel cut made inside ``model``'s forward (see :class:`CutSite`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {m: n for n, m in model.named_modules()}
        self.modules = {n: m for m, n in self.names.items()}
        self.stack: list[str] = []
        self.sites: list[CutSite] = []
        self.counts: dict[str, int] = {}
        self.keep: list[Any] = []  # the grad_fns, alive so that their ids stay theirs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._record(func, args, kwargs, out)
        except Exception:  # never let bookkeeping break the model's forward
            pass
        return out

    def _site(self, kind: str, width: int, sections: tuple[int, ...], grad_fn: Any, **kw: Any) -> None:
        owner = self.stack[-1] if self.stack else ""
        n = self.counts.get(owner + kind, 0)
        self.counts[owner + kind] = n + 1
        self.keep.append(grad_fn)
        self.sites.append(CutSite(f"{owner}:{kind}{n}", kind, owner, width, sections, grad_fn=grad_fn, **kw))

    def _owner(self) -> nn.Module:
        return self.modules[self.stack[-1] if self.stack else ""]

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        if func in _SPLITS or func in _CHUNKS or func in _OTHERS:
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            if not _channel_dim(x, dim):
                return
            parts = list(out) if isinstance(out, (tuple, list)) else [out]
            grad_fn = parts[0].grad_fn if parts and isinstance(parts[0], torch.Tensor) else None
            sections = tuple(int(p.shape[1]) for p in parts)
            if func in _CHUNKS:
                self._site("chunk", int(x.shape[1]), sections, grad_fn)
            elif func in _OTHERS:
                self._site("other", int(x.shape[1]), sections, grad_fn)
            else:
                value = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
                owner = self._owner()
                if isinstance(value, int):
                    found = _int_attrs(owner, value)
                else:
                    found = _list_holder(owner, value) if isinstance(value, (list, tuple)) else []
                holder = (("sizes", found[0]),) if len(found) == 1 else ()
                self._site("split", int(x.shape[1]), sections, grad_fn, holder=holder)
            return
        if func is torch.Tensor.__getitem__ and len(args) > 1:
            self._record_slice(x, args[1], out)

    def _record_slice(self, x: torch.Tensor, index: Any, out: Any) -> None:
        """``x[:, a:b]`` (and ``x[:, a:b, ...]``): a slice of the channel dimension, step 1 or more."""
        idx = index if isinstance(index, tuple) else (index,)
        if len(idx) < 2 or not isinstance(out, torch.Tensor) or x.dim() < 2:
            return
        first, chan = idx[0], idx[1]
        if not (isinstance(first, slice) and first == slice(None)) or not isinstance(chan, slice):
            return  # only a full first (batch) dimension and a slice of the channels
        width = int(x.shape[1])
        start, stop, step = chan.indices(width)
        if (start, stop, step) == (0, width, 1):
            return  # the whole dimension: a no-op view (autograd records an alias)
        grad_fn = _slice_node(out.grad_fn, x.grad_fn)
        owner = self._owner()
        holder: list[tuple[str, str]] = []
        unheld: list[str] = []
        for role, value, free in (("start", chan.start, start == 0), ("stop", chan.stop, stop >= width)):
            if free:
                continue
            found = _int_attrs(owner, int(value)) if isinstance(value, int) else []
            if len(found) == 1:
                holder.append((role, found[0]))
            else:
                unheld.append(role)
        self._site(
            "slice",
            width,
            (int(out.shape[1]),),
            grad_fn,
            start=start,
            stop=stop,
            step=step,
            holder=tuple(holder),
            unheld=tuple(unheld),
        )


def _slice_node(grad_fn: Any, stop_at: Any) -> Any:
    """The autograd node of the channel slice among the view ops from ``grad_fn`` back to the input's."""
    node, steps = grad_fn, 0
    while node is not None and node is not stop_at and steps < 8:
        if "Slice" in type(node).__name__ and getattr(node, "_saved_dim", None) == 1:
            return node
        nxt = [f for f, _ in node.next_functions if f is not None]
        node, steps = (nxt[0] if len(nxt) == 1 else None), steps + 1
    return grad_fn


@contextmanager
def recording(model: nn.Module) -> Iterator[list[CutSite]]:
    """Record the channel cuts of every forward pass of ``model`` run inside the block.

    Yields the list the sites are appended to, in call order. The sites hold their autograd nodes,
    so a graph traced in the block (torch-pruning's) can be matched to them by node identity.
    """
    rec = _Recorder(model)
    handles = []
    for name, mod in model.named_modules():

        def push(m: nn.Module, a: tuple, n: str = name) -> None:
            rec.stack.append(n)

        def pop(m: nn.Module, a: tuple, o: Any) -> None:
            if rec.stack:
                rec.stack.pop()

        handles.append(mod.register_forward_pre_hook(push))
        handles.append(mod.register_forward_hook(pop))
    try:
        with rec:
            yield rec.sites
    finally:
        for h in handles:
            h.remove()


# -- torch-pruning's split index mapping ---------------------------------------------------------


def cut_bounds(node: Any) -> list[int] | None:
    """Where a channel cut of torch-pruning's graph (a split or slice node) parts its input:
    the part boundaries, in the input's channels (None if unknown)."""
    if type(node.module).__name__ == "_SliceOp":
        return [int(node.module.start), int(node.module.end)]
    return _split_bounds(node)


def _split_bounds(node: Any) -> list[int] | None:
    """A channel split's part boundaries ``[0, s0, s0+s1, …]`` from its autograd node, or None."""
    gf = node.grad_fn
    sizes_in = getattr(gf, "_saved_self_sym_sizes", None)
    dim = getattr(gf, "_saved_dim", None)
    if sizes_in is None or not isinstance(dim, int):
        return None
    ndim = len(sizes_in)
    dim = dim + ndim if dim < 0 else dim
    if dim != 1 or dim >= ndim:
        return None
    width = int(sizes_in[1])
    if hasattr(gf, "_saved_split_sizes"):
        sections = [int(s) for s in gf._saved_split_sizes]
    elif hasattr(gf, "_saved_split_size"):
        size = int(gf._saved_split_size)
        sections = [min(size, width - a) for a in range(0, width, size)] if size > 0 else []
    else:
        return None
    bounds = [0]
    for s in sections:
        bounds.append(bounds[-1] + s)
    return bounds


def _split_ranges(node: Any) -> list[tuple[int, int] | None] | None:
    """The channel range of the split's input that each of ``node.outputs`` reads.

    None when the split is not along channels (then every part holds all channels, which is
    torch-pruning's identity mapping) or autograd saved too little to tell; an entry is None when
    that consumer reads several parts of the split at once.
    """
    gf = node.grad_fn
    bounds = _split_bounds(node)
    if bounds is None:
        return None
    ranges: list[tuple[int, int] | None] = []
    for out in node.outputs:
        nexts = getattr(out.grad_fn, "next_functions", ()) or ()
        nrs = {nr for fn, nr in nexts if fn is gf}
        nr = nrs.pop() if len(nrs) == 1 else -1
        ranges.append((bounds[nr], bounds[nr + 1]) if 0 <= nr < len(bounds) - 1 else None)
    return ranges


def unmapped_split(node: Any) -> bool:
    """Whether a split node of torch-pruning's graph has a consumer whose channels it cannot map."""
    return bool(getattr(node.module, "_autodfp_unmapped", False))


def patch_split_mapping() -> None:
    """Make torch-pruning map each part of a channel split to the consumer that reads it.

    Its own mapping (1.6) hands the parts out in the order the graph lists the split's consumers,
    which follows the backward traversal, not the part index, and takes an int split size for
    equal parts. Here the part each consumer reads comes from autograd (the output index of the
    split's node in the consumer's inputs), sizes from the saved split sizes and input width. A
    consumer that reads several parts at once gets no mapping and marks the split unmapped
    (:func:`unmapped_split`), which keeps every group through it whole.
    """
    try:
        from torch_pruning.dependency import index_mapping, shape_infer
    except ImportError:  # another torch-pruning layout: trace as it is
        return
    if getattr(index_mapping.update_split_index_mapping, "_autodfp_patched", False):
        return
    original_init = shape_infer.init_shape_information
    original_update = index_mapping.update_split_index_mapping
    original_concat = index_mapping.update_concat_index_mapping
    split_type = index_mapping.ops.OPTYPE.SPLIT
    concat_type = index_mapping.ops.OPTYPE.CONCAT

    def into_concat(split_node: Any, cat_node: Any, rng: tuple[int, int]) -> None:
        """A part that goes straight into a concat: from the concat back to the split, first the
        concat's own mapping (its block of the concat), then the part's offset in the split. Both
        update functions write one of the two slots, in the wrong order for this direction."""
        offsets = getattr(cat_node.module, "offsets", None)
        if offsets is None or split_node not in cat_node.inputs:
            return
        i = cat_node.inputs.index(split_node)
        for dep in cat_node.dependencies:
            if dep.target is split_node:
                dep.index_mapping[0] = index_mapping._ConcatIndexMapping(offset=offsets[i : i + 2], reverse=True)
                dep.index_mapping[1] = index_mapping._SplitIndexMapping(offset=list(rng), reverse=True)

    def layout(node: Any) -> list[tuple[int, int] | None] | None:
        ranges = _split_ranges(node)
        node.module._autodfp_ranges = ranges
        if ranges is not None:
            node.module._autodfp_unmapped = any(r is None for r in ranges)
            # torch-pruning's shape inference reads split_sizes[i] as the size of outputs[i]
            node.module.split_sizes = [(r[1] - r[0]) if r is not None else 0 for r in ranges]
        return ranges

    def init_shape_information(graph: Any) -> None:
        original_init(graph)
        for node in graph.module2node.values():
            if node.type == split_type:
                layout(node)

    def update_split_index_mapping(graph: Any, split_node: Any) -> None:
        if split_node.type != split_type:
            return
        if not hasattr(split_node.module, "_autodfp_ranges"):
            layout(split_node)
        ranges = split_node.module._autodfp_ranges
        if ranges is None:
            if _split_ranges_unknown(split_node):
                original_update(graph, split_node)
            return
        if not split_node.enable_index_mapping:
            return
        for out_node, rng in zip(split_node.outputs, ranges):
            offset = list(rng) if rng is not None else [0, 0]  # an unmapped consumer maps nothing
            for dep in split_node.dependencies:
                if dep.target is out_node:
                    dep.index_mapping[0] = index_mapping._SplitIndexMapping(offset=offset, reverse=False)
            for dep in out_node.dependencies:
                if dep.target is split_node:
                    dep.index_mapping[0] = index_mapping._SplitIndexMapping(offset=offset, reverse=True)
            if rng is not None and out_node.type == concat_type:
                into_concat(split_node, out_node, rng)

    def update_concat_index_mapping(graph: Any, cat_node: Any) -> None:
        original_concat(graph, cat_node)
        for in_node in cat_node.inputs:
            if in_node.type != split_type or not in_node.enable_index_mapping:
                continue
            ranges = getattr(in_node.module, "_autodfp_ranges", None) or []
            for out_node, rng in zip(in_node.outputs, ranges):
                if out_node is cat_node and rng is not None:
                    into_concat(in_node, cat_node, rng)

    update_split_index_mapping._autodfp_patched = True  # type: ignore[attr-defined]
    shape_infer.init_shape_information = init_shape_information
    index_mapping.update_split_index_mapping = update_split_index_mapping
    index_mapping.update_concat_index_mapping = update_concat_index_mapping


def _split_ranges_unknown(node: Any) -> bool:
    """A split whose autograd node saved no dimension or sizes: leave it to torch-pruning."""
    gf = node.grad_fn
    return getattr(gf, "_saved_self_sym_sizes", None) is None or not isinstance(getattr(gf, "_saved_dim", None), int)


# -- after the prune -------------------------------------------------------------------------------


def _after(site: CutSite, removed: set[int]) -> tuple[int, ...] | tuple[int, int]:
    """A cut's new part sizes (split), or new ``(start, stop)`` (slice), once ``removed`` input
    channels (indices in the cut's input, before the prune) are gone."""
    if site.kind == "slice":
        start = site.start - sum(1 for i in removed if i < site.start)
        stop = site.stop - sum(1 for i in removed if i < site.stop)
        return start, stop
    bounds = [0]
    for s in site.sections:
        bounds.append(bounds[-1] + s)
    return tuple(s - sum(1 for i in removed if bounds[k] <= i < bounds[k + 1]) for k, s in enumerate(site.sections))


def _int_split(sizes: Sequence[int]) -> int | None:
    """The int split size that yields ``sizes`` (all equal, the last one possibly smaller), if any."""
    if not sizes or any(s != sizes[0] for s in sizes[:-1]) or not 0 < sizes[-1] <= sizes[0]:
        return None
    return sizes[0]


def apply_cuts(
    model: nn.Module,
    sites: Sequence[CutSite],
    removed: dict[str, set[int]],
    forward: Callable[[], Any],
) -> None:
    """Rewrite the holders of every cut that lost input channels, then check the cuts by a forward.

    ``removed`` maps a site's key to the input channels (pre-prune indices) the prune removed
    there. A split's list holder gets the new sizes (same container type); an int holder keeps an
    int where the new parts still fit one (equal parts, a smaller last one), else becomes the list of
    sizes, which ``torch.split`` takes alike. A slice's holders get the new bounds. ``forward`` runs
    the pruned model once; every cut it makes must then have the sizes computed here, or this raises
    :class:`ModelError` (the model would cut its channels at the wrong places).
    """
    modules = dict(model.named_modules())
    expected: dict[str, tuple[int, ...]] = {}
    for site in sites:
        gone = removed.get(site.key, set())
        if not gone:
            continue
        owner = modules[site.owner]
        new = _after(site, gone)
        roles = {r for r, _ in site.holder}
        if site.kind == "slice":
            moved = {"start"} if new[0] != site.start else set()
            moved |= {"stop"} if site.stop < site.width and new[1] != site.stop else set()
            ok = site.step == 1 and moved <= roles
        else:
            ok = site.patchable
        if not ok:
            raise ModelError(f"pruning removed channels through {site.describe()}; it cannot be updated")
        if site.kind == "split":
            attr = site.holder[0][1]
            old = getattr(owner, attr)
            sizes = list(new)
            if isinstance(old, int):
                size = _int_split(sizes)
                setattr(owner, attr, size if size is not None else sizes)
            else:
                setattr(owner, attr, type(old)(sizes))
            expected[site.key] = tuple(sizes)
        else:
            for role, attr in site.holder:
                setattr(owner, attr, new[0] if role == "start" else new[1])
            expected[site.key] = (max(0, new[1] - new[0]),)
    if not expected:
        return
    try:
        with recording(model) as seen, torch.no_grad():
            forward()
    except Exception as exc:
        raise ModelError(
            f"the pruned model no longer runs after its channel cuts were resized ({exc.__class__.__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
        ) from None
    got = {s.key: s.sections for s in seen}
    for key, want in expected.items():
        if got.get(key) != want:
            raise ModelError(
                f"after pruning, the channel cut {key} gives parts {got.get(key)}, not the expected {want}: "
                "its sizes do not come from the attribute autodfp updated"
            )
