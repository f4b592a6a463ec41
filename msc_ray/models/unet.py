"""The U-Net segmenter: six maps (cell and nucleus foreground, contacts, offsets to the nucleus)
and the instances drawn from them (seeded watershed for nuclei, votes for cells), with test-time views."""

from __future__ import annotations

import torch
from torch import nn

from .. import check_views


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def instance_contacts(ids: torch.Tensor) -> torch.Tensor:
    """(N, H, W) instance ids → bool (N, H, W): pixels of an instance that touch another instance (a
    different non-zero id in their 3 × 3 neighbourhood). Where two cells meet, both sides are marked."""
    import torch.nn.functional as F

    p = F.pad(ids[:, None].float(), (1, 1, 1, 1), mode="replicate")
    hi = F.max_pool2d(p, 3, 1)[:, 0]
    lo = -F.max_pool2d(-p.masked_fill(p == 0, float("inf")), 3, 1)[:, 0]
    f = ids.float()
    return (ids > 0) & ((hi != f) | ((lo != f) & torch.isfinite(lo)))


# vote-centre thresholds the inner validation folds choose from (votes per pixel after σ 1 px smoothing; 0: off)
VOTE_PEAKS = (0.0, 3.0, 4.0, 6.0)


OFFSET_SCALE = 16.0  # pixels per unit of the U-Net's offset maps (a cell's pixels lie within ~30 px of its nucleus)


# the offsets' share of the U-Net's loss: at 1 the votes of cell-edge pixels fall short of their nucleus
# (README "Morphology and potency"; chosen on new vessels, seed 1234, with 32 channels at full resolution)
OFFSET_WEIGHT = 4.0


def _centroids(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) binary masks → (K, 2) float centroids (y, x) in pixels (pixel centres)."""
    h, w = masks.shape[-2:]
    m = masks.float()
    area = m.sum((1, 2)).clamp(min=1)
    ys = torch.arange(h, dtype=torch.float32, device=m.device).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=m.device).view(1, 1, w)
    return torch.stack([(m * ys).sum((1, 2)) / area, (m * xs).sum((1, 2)) / area], 1)


class UNetWatershed(nn.Module):
    """Cells and nuclei as a U-Net's pixel maps, turned into instances by seeded watershed and by
    votes for each cell pixel's nucleus (the foreground-and-contour approach of nucleus segmentation,
    with the pixel-to-centre offsets of bottom-up instance segmentation).

    Six output maps: cell foreground, cell contacts (pixels where a cell touches another), nucleus
    foreground, nucleus contacts, and the offset (y, x; in units of :data:`OFFSET_SCALE` px) from each
    cell pixel to the centre of its own cell's nucleus (of the cell itself where no nucleus shows).
    Nuclei: watershed (scikit-image) of ``contact − foreground`` from the connected cores (foreground
    without contacts). Cells: each foreground pixel goes to the nucleus its offset points into (grown
    by ``vote_radius`` px); an MSC has one nucleus, and a spindle that a later cell crosses keeps both
    visible parts, which no region growing can join (about half the visible cells of a dense synthetic
    culture are in parts). Foreground that votes for no nucleus is flooded from the voted cells over
    the relief ``contacts − foreground`` where it touches them, and becomes cells of its own where it
    does not. With ``vote_peak`` > 0 the votes also find nuclei the maps merge: the votes are counted per
    pixel and smoothed (Gaussian, σ 1 px), and every local maximum of at least ``vote_peak`` votes is a
    nucleus centre; a (grown) nucleus holding two or more centres is split between them (nearest
    centre), and a centre outside every nucleus (a cell whose nucleus is hidden) becomes a seed of
    ``vote_radius`` px of its own. Touching nuclei of a dense culture merge in the maps at a few pixels
    wide; their cells' votes still point at two centres. ``vote_peak`` is chosen on the inner validation
    folds (:data:`VOTE_PEAKS`, :func:`msc_ray.segment.choose_vote_peak`); 0 turns it off (artifacts
    saved before it). ``views`` (1, 4 or 8): the maps are averaged over that many exact pixel moves of
    the image (test-time augmentation, :meth:`maps`), each moved back, offsets turned with it, before
    the instances are drawn from them. An instance's score is its mean foreground probability times one minus its mean
    contact probability (``contact_score``; artifacts saved before it: the mean foreground probability
    alone): a piece cut out between overlapping cells is mostly contact pixels, and ranking such pieces
    last raised outer-fold cell mask AP@0.5 from 0.307 to 0.468 (README). Smaller than ``min_area``
    pixels: dropped. ``offsets=False``: the four-map model of earlier artifacts (cells flooded from
    the nuclei over that relief).

    The interface of torchvision's detection models, so training, evaluation and scoring treat it like
    Mask R-CNN: input a list of float (3, H, W) in [0, 1] (standardised per image here); in training
    mode with targets (``masks`` (K, H, W), ``labels`` 1 cell / 2 nucleus) → ``{"loss_foreground",
    "loss_contact", "loss_dice", "loss_offset"}`` (binary cross-entropy, contacts weighted
    ``contact_weight`` as they are rare; soft Dice of the four binary maps; smooth L1 of the offsets
    over cell pixels, times ``offset_weight``); in eval mode → per image ``{"boxes", "labels", "scores",
    "masks" (K, 1, H, W)}``."""

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        *,
        score_thresh: float = 0.05,
        detections_per_img: int = 500,
        min_area: int = 4,
        contact_weight: float = 4.0,
        offset_weight: float = OFFSET_WEIGHT,
        offsets: bool = True,
        vote_radius: float = 2.0,
        vote_peak: float = 0.0,
        contact_score: bool = True,
        views: int = 1,
    ):
        super().__init__()
        check_views(views, f"views={views}")
        self.contact_score, self.views = contact_score, views
        self.score_thresh, self.detections_per_img, self.min_area = score_thresh, detections_per_img, min_area
        self.offsets, self.vote_radius, self.vote_peak = offsets, vote_radius, float(vote_peak)
        self.offset_weight = offset_weight
        self.register_buffer("pos_weight", torch.tensor([1.0, contact_weight, 1.0, contact_weight]).view(1, 4, 1, 1))
        self.norm = nn.InstanceNorm2d(3, affine=False)
        self.down = nn.ModuleList(_double_conv(3 if i == 0 else widths[i - 1], w) for i, w in enumerate(widths))
        rev = list(range(len(widths) - 1, 0, -1))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2) for i in rev)
        self.dec = nn.ModuleList(_double_conv(2 * widths[i - 1], widths[i - 1]) for i in rev)
        self.head = nn.Conv2d(widths[0], 6 if offsets else 4, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, 6 or 4, H, W) outputs (padded inside to a multiple of the deepest stride):
        four logits, then the two offset maps."""
        import torch.nn.functional as F

        h, w = x.shape[-2:]
        m = 2 ** (len(self.down) - 1)
        x = F.pad(self.norm(x), (0, -w % m, 0, -h % m), mode="replicate")
        # the builder's layout, read off a 3 × 3 kernel (a 1 × 1 one is contiguous in both layouts)
        if self.down[0][0].weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1]), strict=True):
            x = dec(torch.cat([up(x), skip], 1))
        return self.head(x)[..., :h, :w]

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        x = torch.stack(images)
        if self.training:
            if targets is None:
                raise ValueError("UNetWatershed needs targets in training mode")
            out = self.logits(x)
            y = torch.stack([self.target_maps(t, self.offsets) for t in targets]).to(out.device)
            return self.losses(out, y)
        return [self.instances(p, x.device) for p in self.maps(x).detach().cpu().numpy()]

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, 6 or 4, H, W) float32: the four probabilities, then the offsets, averaged
        over :attr:`views` views of each image. View ``i`` is :func:`msc_ray.engine.dihedral_view`
        (quarter turns, then a mirror); its maps are mirrored and turned back, and its offset vectors
        with them, so every view speaks of the same pixels in the same directions. A culture has no up
        or left: on new vessels the eight-view mean raised cell / nucleus mask AP@0.5 by several points
        (README)."""
        from ..engine import view_mean

        def probabilities(v: torch.Tensor) -> torch.Tensor:
            out = self.logits(v).float()
            return torch.cat([torch.sigmoid(out[:, :4]), out[:, 4:]], 1)

        return view_mean(probabilities, x, self.views, back=lambda out, i: _undo_view(out, i, self.offsets))

    def losses(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch.nn.functional as F

        out = out.float()  # under autocast the maps come in bfloat16: losses and sums in float32
        logits, maps = out[:, :4], y[:, :4]
        bce = F.binary_cross_entropy_with_logits(logits, maps, pos_weight=self.pos_weight, reduction="none")
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * maps).sum((0, 2, 3)) + 1) / ((p + maps).sum((0, 2, 3)) + 1)
        losses = {"loss_foreground": bce[:, 0::2].mean(), "loss_contact": bce[:, 1::2].mean(), "loss_dice": dice.mean()}
        if self.offsets:
            cell = maps[:, :1]
            err = F.smooth_l1_loss(out[:, 4:6], y[:, 4:6], reduction="none", beta=0.1) * cell
            losses["loss_offset"] = self.offset_weight * err.sum() / (2 * cell.sum()).clamp(min=1)
        return losses

    @staticmethod
    def target_maps(target: dict, offsets: bool = True) -> torch.Tensor:
        """Mask R-CNN targets of one image → (6, H, W) float (``offsets=False``: the first four): cell
        foreground, cell contacts, nucleus foreground, nucleus contacts, and per cell pixel the offset
        (y, x) ÷ :data:`OFFSET_SCALE` to the centre of the nucleus that lies in that cell (of the cell's
        visible pixels where it shows none), 0 elsewhere."""
        maps, ids = [], []
        for label in (1, 2):
            m = target["masks"][target["labels"] == label].to(torch.int64)
            # one class's instances are disjoint: the weighted sum is its id map (all zeros when it has none)
            ids.append((m * torch.arange(1, len(m) + 1, device=m.device).view(-1, 1, 1)).sum(0))
            maps += [ids[-1] > 0, instance_contacts(ids[-1][None])[0]]
        maps = [m.float() for m in maps]
        if offsets:
            maps += list(UNetWatershed._offset_targets(target, ids[0]))
        return torch.stack(maps)

    @staticmethod
    def _offset_targets(target: dict, cell_ids: torch.Tensor) -> torch.Tensor:
        cells = target["masks"][target["labels"] == 1].bool()
        nuclei = target["masks"][target["labels"] == 2].bool()
        h, w = cell_ids.shape
        dev = cell_ids.device
        if not len(cells):
            return torch.zeros((2, h, w), device=dev)
        centre = _centroids(cells)
        if len(nuclei):
            overlap = cells.flatten(1).float() @ nuclei.flatten(1).float().T  # (cells, nuclei) shared pixels
            best, which = overlap.max(1)
            centre = torch.where((best > 0)[:, None], _centroids(nuclei)[which], centre)
        anchor = torch.cat([centre.new_zeros(1, 2), centre])[cell_ids]  # (H, W, 2); background → 0
        grid = torch.stack(torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij"), -1)
        return ((anchor - grid.float()) * (cell_ids > 0)[..., None] / OFFSET_SCALE).permute(2, 0, 1)

    def instances(self, p, device=None) -> dict:
        """(6 or 4, H, W) maps (probabilities, then offsets) → one image's detections (see the class)."""
        import numpy as np
        from scipy import ndimage as ndi
        from skimage.measure import label as connected
        from skimage.segmentation import watershed
        from torchvision.ops import masks_to_boxes

        nuc_fg = p[2] >= 0.5
        nuclei = watershed(p[3] - p[2], connected(nuc_fg & (p[3] < 0.5), connectivity=1), mask=nuc_fg)
        cell_fg = p[0] >= 0.5
        if len(p) > 4:
            cells, nuclei = self._votes(p, nuclei, cell_fg)
        else:
            cells = np.where(cell_fg, nuclei, 0)
        cells = watershed(p[1] - p[0], cells, mask=cell_fg)
        orphans = connected(cell_fg & (cells == 0), connectivity=1)
        cells = np.where(orphans > 0, orphans + cells.max(), cells)
        masks, scores, labels = [], [], []
        for lab, prob, contact, cls in ((cells, p[0], p[1], 1), (nuclei, p[2], p[3], 2)):
            ids = np.unique(lab[lab > 0])
            if not len(ids):
                continue
            area = ndi.sum_labels(np.ones_like(prob), lab, ids)
            mean = ndi.mean(prob, lab, ids)
            if self.contact_score:
                mean = mean * (1.0 - ndi.mean(contact, lab, ids))
            keep = (area >= self.min_area) & (mean >= self.score_thresh)
            for k, s in zip(ids[keep], mean[keep], strict=True):
                masks.append(lab == k)
                scores.append(float(s))
                labels.append(cls)
        order = np.argsort(scores)[::-1][: self.detections_per_img]
        h, w = p.shape[-2:]
        if len(order):
            m = torch.from_numpy(np.stack([masks[i] for i in order]))
        else:
            m = torch.zeros((0, h, w), dtype=torch.bool)
        boxes = masks_to_boxes(m) if len(m) else torch.zeros((0, 4))
        boxes[:, 2:] += 1  # pixel edges, as the targets' boxes
        return {
            "boxes": boxes.to(device),
            "labels": torch.tensor([labels[i] for i in order], dtype=torch.int64, device=device),
            "scores": torch.tensor([scores[i] for i in order], dtype=torch.float32, device=device),
            "masks": m[:, None].float().to(device),
        }

    def _votes(self, p, nuclei, cell_fg):
        """Cell ids from the offset maps: each foreground pixel takes the id of the nucleus (grown by
        ``vote_radius`` px) its offset points into, 0 where it points into none. Returns ``(cells,
        nuclei)``: the nuclei split between the centres the votes find when ``vote_peak`` > 0."""
        import numpy as np
        from skimage.segmentation import expand_labels

        h, w = cell_fg.shape
        target = expand_labels(nuclei, distance=self.vote_radius).astype(np.int64)
        ys, xs = np.nonzero(cell_fg)
        vy = np.clip(np.rint(ys + p[4, ys, xs] * OFFSET_SCALE), 0, h - 1).astype(np.int64)
        vx = np.clip(np.rint(xs + p[5, ys, xs] * OFFSET_SCALE), 0, w - 1).astype(np.int64)
        if self.vote_peak > 0 and len(ys):
            target = self._split_by_centres(target, vy, vx)
            nuclei = np.where(nuclei > 0, target, 0)
        cells = np.zeros((h, w), np.int64)
        cells[ys, xs] = target[vy, vx]
        return cells, nuclei

    def _split_by_centres(self, target, vy, vx):
        """The grown nucleus map with each region that holds several vote centres split between them
        (nearest centre), and a seed of ``vote_radius`` px added at every centre outside all regions."""
        import numpy as np
        from scipy import ndimage as ndi
        from skimage.feature import peak_local_max
        from skimage.segmentation import expand_labels

        h, w = target.shape
        votes = np.zeros((h, w), np.float64)
        np.add.at(votes, (vy, vx), 1.0)
        centres = peak_local_max(
            ndi.gaussian_filter(votes, 1.0), min_distance=1, threshold_abs=self.vote_peak, exclude_border=False
        )
        if not len(centres):
            return target
        target = target.copy()
        owner = target[centres[:, 0], centres[:, 1]]
        nxt = int(target.max()) + 1
        for k in np.unique(owner[owner > 0]):
            mine = centres[owner == k]
            if len(mine) < 2:
                continue
            ry, rx = np.nonzero(target == k)
            near = ((ry[:, None] - mine[None, :, 0]) ** 2 + (rx[:, None] - mine[None, :, 1]) ** 2).argmin(1)
            target[ry, rx] = np.where(near == 0, k, nxt + near - 1)
            nxt += len(mine) - 1
        free = centres[owner == 0]
        if len(free):
            seeds = np.zeros((h, w), np.int64)
            seeds[free[:, 0], free[:, 1]] = np.arange(nxt, nxt + len(free))
            grown = expand_labels(seeds, distance=self.vote_radius)
            target = np.where((target == 0) & (grown > 0), grown, target)
        return target


def _undo_view(maps: torch.Tensor, i: int, offsets: bool) -> torch.Tensor:
    """Maps computed on :func:`msc_ray.engine.dihedral_view` ``i`` of an image, brought back to the
    image's own frame; with ``offsets``, channels 4–5 are vectors (y, x) and turn with the pixels.
    ``torch.rot90`` by one quarter (dims 2 → 3) takes the pixel (y, x) to (W − 1 − x, y), and so a
    vector (dy, dx) to (−dx, dy); a left-right mirror takes (dy, dx) to (dy, −dx)."""
    turns = i // 2
    if i % 2:
        maps = torch.flip(maps, (3,))
        if offsets:
            maps = torch.cat([maps[:, :5], -maps[:, 5:6]], 1)
    if turns:
        maps = torch.rot90(maps, -turns, (2, 3))
        if offsets:
            dy, dx = maps[:, 4:5], maps[:, 5:6]
            for _ in range(turns):  # a quarter turn back: (dy, dx) → (dx, −dy)
                dy, dx = dx, -dy
            maps = torch.cat([maps[:, :4], dy, dx], 1)
    return maps


def unet_widths(state: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """A U-Net's channels per level, read from its weights (the first convolution of each down block);
    None for other segmenters. Artifacts keep the widths they were trained with when a default changes."""
    widths, i = [], 0
    while f"down.{i}.0.weight" in state:
        widths.append(int(state[f"down.{i}.0.weight"].shape[0]))
        i += 1
    return tuple(widths) or None
