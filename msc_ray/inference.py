"""One image in, one answer out: the preprocessing, model loading, forward pass and reading of the
outputs that archive scoring (:mod:`msc_ray.score`) and the online service (:mod:`msc_ray.serve`)
share, so a row of the report and a reply of the page are the same computation.

* :func:`fit_u8` / :class:`ScoringInput` — decoded uint8 images → the model's input, in two steps
  (channels, equalisation and resize in uint8 — the training cache's own steps —, then normalisation),
  on the CPU or on the model's device; :func:`classifier_input` / :func:`detector_input` — the same for
  one image (uint8, or float in [0, 1] from :func:`msc_ray.images.decode`).
* :class:`Classifier` / :class:`Detector` — an artifact loaded once onto a device; a batch of inputs
  → calibrated probabilities (+ regressed confluence) / boxes in the original image's pixels. On a
  GPU the classifier can run in bfloat16 (:meth:`Classifier.to_bfloat16`), the detector and segmenter
  under bfloat16 autocast with box coordinates kept in float32 (:func:`float32_boxes`).
* :func:`interpret` — probabilities → predicted class, band and confluence % (inside the band).
* :meth:`Classifier.grad_cam` — which regions drove the predicted class (captum's ``LayerGradCam``).
* :class:`Segmenter` — a segmenter artifact: an image → cell and nucleus instance maps.
"""

from __future__ import annotations

import numpy as np

from . import BAND_EDGES, BAND_NAMES, metrics

BAND_LABELS = {name: f"{100 * BAND_EDGES[i]:.0f}-{100 * BAND_EDGES[i + 1]:.0f}%" for i, name in enumerate(BAND_NAMES)}


def classifier_config(data_cfg: dict):
    """A classifier artifact's ``data`` config (size, channels, equalise, normalisation) as a
    :class:`msc_ray.config.DataConfig`."""
    from .config import DataConfig, from_dict

    return from_dict(DataConfig, data_cfg)


def as_u8(img: np.ndarray) -> np.ndarray:
    """A decoded image: uint8 as it is; float in [0, 1] (:func:`msc_ray.images.decode`) → the nearest
    of 256 levels (exactly the stored values for an 8-bit image)."""
    if img.dtype == np.uint8:
        return img
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def classifier_input(img: np.ndarray, cfg) -> np.ndarray:
    """One decoded image (uint8, or float in [0, 1]) → the classifier's input ``(channels, size,
    size)`` float32: the steps archive scoring takes (:func:`fit_u8`, :class:`ScoringInput`)."""
    import torch

    x = ScoringInput(cfg, torch.device("cpu"))(as_u8(img)[None])[0]
    return np.ascontiguousarray(x.numpy())


def detector_input(img: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One decoded image → (the detector's or segmenter's input ``(3, size, size)`` in [0, 1], the scale
    back to original pixels ``(sx, sy)``)."""
    h, w = img.shape[-2:]
    return classifier_input(img, box_model_config(size)), np.array([w / size, h / size], np.float32)


def box_model_config(size: int):
    """How the detector's and the segmenter's inputs are made: 3 channels at ``size``, in [0, 1] (the
    torchvision models normalise inside their own transform)."""
    from .config import DataConfig

    return DataConfig(size=size, channels=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def fit_u8(x, cfg):
    """Decoded uint8 images ``(N, C, H, W)`` (a torch tensor on any device) → uint8 ``(N, cfg.channels,
    S, S)``: the model's channels, histogram-equalised if ``cfg.equalize``, resized with antialiasing
    — the steps, and the rounding back to uint8, of the training cache (:func:`msc_ray.data.build_cache`),
    so a scored image reaches the model exactly as a validation image did. Archive scoring runs this in
    its CPU decode tasks, or on the model actor's GPU (:class:`ScoringInput`)."""
    import torch
    from torchvision.transforms import v2

    from . import augment

    f = x.float().div_(255.0)
    if f.shape[1] == 3 and cfg.channels == 1:
        f = f.mean(1, keepdim=True)
    # a gray image is equalised and resized as one channel and then repeated: the same values as
    # repeating it first (each step works per channel), a third of the work
    f = v2.Compose(augment.preprocess(cfg))(f)
    out = (f.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
    return out.expand(-1, cfg.channels, -1, -1).contiguous() if out.shape[1] != cfg.channels else out


class ScoringInput:
    """Prepared uint8 batches → what a model takes, on the model's device: ``(N, C, S, S)`` float,
    normalised with ``cfg``'s mean and std (identity for a detector's [0, 1] config), in channels-last
    memory. Batches that arrive at full size (the GPU path: decode tasks ship decoded images as they
    are) are first fitted here with :func:`fit_u8`, grouped by size."""

    def __init__(self, cfg, device):
        import torch

        self.cfg, self.device = cfg, device
        self.mean = torch.tensor(cfg.norm_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.norm_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def to_device(self, arr: np.ndarray):
        return to_device(arr, self.device)

    def fitted(self, images_u8) -> object:
        """uint8 images, one ``(N, C, H, W)`` array or a sequence of ``(C, H, W)`` arrays of any sizes
        → uint8 ``(N, channels, S, S)`` on the device."""
        import torch

        s, c = self.cfg.size, self.cfg.channels
        if isinstance(images_u8, np.ndarray) and images_u8.dtype == np.uint8 and images_u8.ndim == 4:
            x = self.to_device(images_u8)
            return x if tuple(x.shape[1:]) == (c, s, s) else fit_u8(x, self.cfg)
        items = list(images_u8)
        out = torch.empty((len(items), c, s, s), dtype=torch.uint8, device=self.device)
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(items):
            groups.setdefault(tuple(a.shape), []).append(i)
        for shape, idx in groups.items():
            x = self.to_device(np.stack([items[i] for i in idx]))
            out[torch.as_tensor(idx, device=self.device)] = x if shape == (c, s, s) else fit_u8(x, self.cfg)
        return out

    def __call__(self, images_u8):
        import torch

        x = self.fitted(images_u8).float().div_(255.0)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def to_device(arr: np.ndarray, device):
    """A numpy array as a tensor on ``device``: on a GPU through pinned memory, non-blocking (the
    scoring actor's batches and the GPU trials' training batches)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def artifact_views(config: dict) -> int:
    """The test-time views a classifier artifact's temperature was fitted with (artifacts saved before
    the views: one)."""
    return int(config.get("views", 1))


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Classifier:
    """A classifier artifact on a device. ``classes``, ``temperature``, ``version`` and ``config`` come
    from the artifact; :meth:`prepare` is :func:`classifier_input` with its config."""

    def __init__(self, uri: str, endpoint_url: str | None = None, device=None):
        from . import models

        self.uri = uri
        self.device = device or default_device()
        self.model, self.config = models.load_classifier(uri, endpoint_url)
        self.model.to(self.device)
        self.classes = list(self.config["classes"])
        self.temperature = float(self.config.get("temperature", 1.0))
        self.version = self.config.get("version", "")
        self.views = artifact_views(self.config)  # engine.view_mean
        self.data_cfg = classifier_config(self.config["data"])
        self.weights_dtype = next(self.model.parameters()).dtype

    @property
    def is_bands(self) -> bool:
        """Whether the classes are the four confluence bands (then a confluence % is meaningful)."""
        return self.classes == list(BAND_NAMES)

    def prepare(self, img: np.ndarray) -> np.ndarray:
        return classifier_input(img, self.data_cfg)

    def __call__(self, x) -> tuple[np.ndarray, np.ndarray]:
        """``(N, C, S, S)`` inputs (numpy, or a tensor already on the device) → (calibrated
        probabilities ``(N, K)``, regressed confluence ``(N,)`` as a fraction, NaN where the model has
        no such output). On a GPU the forward pass runs under bfloat16 autocast, or with the weights
        themselves in bfloat16 after :meth:`to_bfloat16`; the softmax is taken in float32. The outputs
        are averaged over the artifact's test-time ``views`` (:func:`msc_ray.engine.view_mean`)."""
        import torch

        from .engine import view_mean

        k = len(self.classes)
        amp = self.device.type == "cuda" and self.weights_dtype == torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            out = view_mean(self.model, _as_tensor(x, self.device).to(self.weights_dtype), self.views)
            probs = torch.softmax(out[:, :k] / self.temperature, 1).cpu().numpy()
            conf = torch.sigmoid(out[:, k]).cpu().numpy() if out.shape[1] > k else np.full(len(x), np.nan)
        return probs.astype(np.float32), conf.astype(np.float32)

    def to_bfloat16(self) -> Classifier:
        """Weights (and inputs) in bfloat16, channels-last kept: on an H100, ResNet-50 at 300 px ran
        7,074 images/s against 4,720 under autocast with float32 weights."""
        import torch

        self.model.to(dtype=torch.bfloat16)
        self.weights_dtype = torch.bfloat16
        return self

    def cam_layer(self):
        """The layer Grad-CAM reads: the last module with a spatial (more than 1×1) 4-D output, found
        by one forward pass; None for a vision transformer (no convolutional map to explain)."""
        import torch

        if str(self.config.get("architecture", "")).startswith("vit"):
            return None
        last: list = []

        def hook(module, _inp, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] > 1 and out.shape[-2] > 1:
                last[:] = [module]

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            size = self.data_cfg.size
            with torch.inference_mode():
                self.model(torch.zeros(1, self.data_cfg.channels, size, size, device=self.device))
        finally:
            for h in handles:
                h.remove()
        return last[0] if last else None

    def grad_cam(self, x: np.ndarray, target: int) -> np.ndarray | None:
        """Grad-CAM of class ``target`` for one input ``(C, S, S)`` → ``(S, S)`` in [0, 1] (ReLU of the
        gradient-weighted feature map, upsampled to the input); None where no layer applies."""
        import torch
        from captum.attr import LayerAttribution, LayerGradCam

        if not hasattr(self, "_cam_layer"):
            self._cam_layer = self.cam_layer()
        if self._cam_layer is None:
            return None
        k = len(self.classes)
        gc = LayerGradCam(lambda t: self.model(t)[:, :k], self._cam_layer)
        inp = torch.from_numpy(np.ascontiguousarray(x))[None].to(self.device).requires_grad_(True)
        with torch.enable_grad():
            attr = gc.attribute(inp, target=int(target), relu_attributions=True)
        up = LayerAttribution.interpolate(attr.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
        cam = up[0].sum(0).float().cpu().numpy()
        hi = float(cam.max())
        return (cam / hi if hi > 0 else cam).astype(np.float32)


def _as_tensor(x, device):
    """A numpy array → a tensor on ``device``; a tensor → itself on ``device``."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device)
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def _cast_float32(_module, _inputs, output):
    import torch

    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, dict):
        return type(output)((k, _cast_float32(None, None, v)) for k, v in output.items())
    if isinstance(output, list | tuple):
        return type(output)(_cast_float32(None, None, v) for v in output)
    return output


def float32_boxes(model):
    """Under bfloat16 autocast a torchvision detector makes its anchors in the dtype of its feature
    maps and decodes boxes in that of its heads' outputs: box coordinates in bfloat16, 2-pixel steps
    at 256–512 px. Hooks hand the feature maps and the heads' outputs on as float32, so the
    convolutions run in bfloat16 and anchors, box decoding, NMS and masks in float32. Returns the model."""
    for name in ("backbone", "head", "rpn.head", "roi_heads.box_predictor", "roi_heads.mask_predictor"):
        try:
            sub = model.get_submodule(name)
        except AttributeError:
            continue
        sub.register_forward_hook(_cast_float32)
    return model


def _forward(model, inputs, device, amp: bool | None = None) -> list[dict]:
    """A torchvision detection model on ``(3, S, S)`` inputs (a list of arrays, or an ``(N, 3, S, S)``
    tensor), under inference mode; ``amp`` (default: on a GPU) runs it under bfloat16 autocast."""
    import torch

    amp = device.type == "cuda" if amp is None else amp
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return model([_as_tensor(x, device) for x in inputs])


class Detector:
    """A detector artifact on a device; ``size`` is its input side."""

    def __init__(self, uri: str, endpoint_url: str | None = None, device=None):
        from . import models

        self.uri = uri
        self.device = device or default_device()
        self.model, self.config = models.load_detector(uri, endpoint_url)
        float32_boxes(self.model).to(self.device)
        self.size = int(self.config["image_size"])
        self.version = self.config.get("version", "")

    def prepare(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return detector_input(img, self.size)

    def __call__(self, inputs: list[np.ndarray], scales: list[np.ndarray]) -> list[list[list[float]]]:
        """Detector inputs and their scales → per image ``[[x1, y1, x2, y2, score], ...]`` in the
        original image's pixels."""
        if len(inputs) == 0:
            return []
        res = _forward(self.model, inputs, self.device)
        out = []
        for r, s in zip(res, scales, strict=True):
            b = r["boxes"].float().cpu().numpy() * np.tile(np.asarray(s, np.float32), 2)
            sc = r["scores"].float().cpu().numpy()
            out.append([[round(float(v), 2) for v in bb] + [round(float(p), 4)] for bb, p in zip(b, sc, strict=True)])
        return out


class Segmenter:
    """A segmenter artifact on a device: an image → cell and nucleus instance maps at the image's own
    size, read at the artifact's score thresholds (chosen on the inner validation folds). ``views``
    (1, 4 or 8; a U-Net's): test-time views instead of the artifact's own (0)."""

    def __init__(self, uri: str, endpoint_url: str | None = None, device=None, views: int = 0):
        from . import check_views, models

        self.uri = uri
        self.device = device or default_device()
        self.model, self.config = models.load_segmenter(uri, endpoint_url)
        if views:
            check_views(views, f"--views {views}")
            if not hasattr(self.model, "views"):
                raise ValueError(f"--views {views}: {uri} is not a U-Net segmenter (it has no test-time views)")
            self.model.views = views
        float32_boxes(self.model).to(self.device)
        self.size = int(self.config["image_size"])
        self.thresholds = self.config["score_thresholds"]
        self.version = self.config.get("version", "")

    def prepare(self, img: np.ndarray) -> np.ndarray:
        return detector_input(img, self.size)[0]

    def label_maps(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decoded image (C, H, W) → ``(cells, nuclei)`` int32 (H, W) instance maps, 0 = background."""
        return self([self.prepare(img)], [img.shape[-2:]])[0]

    def __call__(self, inputs: list[np.ndarray], shapes: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """Segmenter inputs (:meth:`prepare`) and the original ``(H, W)`` of each → per image
        ``(cells, nuclei)`` int32 instance maps at that size. Cells are painted lowest score first, so
        where two masks overlap the surer cell keeps the pixel; a nucleus takes the id of the cell it
        overlaps most (a nucleus on no cell is dropped)."""
        import torch
        from torchvision.transforms.v2 import functional as F

        if len(inputs) == 0:
            return []
        res = _forward(self.model, inputs, self.device)
        out = []
        for r, (h, w) in zip(res, shapes, strict=True):
            masks = (r["masks"][:, 0].float() >= 0.5).cpu()
            scores, labels = r["scores"].float().cpu(), r["labels"].cpu()
            cells = torch.zeros((self.size, self.size), dtype=torch.int32)
            keep = torch.nonzero((labels == 1) & (scores >= self.thresholds["cell"])).flatten()
            for n, i in enumerate(keep[torch.argsort(scores[keep])].tolist(), start=1):
                cells[masks[i]] = n
            nuclei = torch.zeros_like(cells)
            keep = torch.nonzero((labels == 2) & (scores >= self.thresholds["nucleus"])).flatten()
            for i in keep[torch.argsort(scores[keep])].tolist():
                under = cells[masks[i]]
                under = under[under > 0]
                if len(under):
                    owner = int(torch.mode(under).values)
                    nuclei[masks[i] & (cells == owner)] = owner
            size = [int(h), int(w)]
            back = [F.resize(m[None], size, interpolation=F.InterpolationMode.NEAREST)[0] for m in (cells, nuclei)]
            out.append((back[0].numpy(), back[1].numpy()))
        return out


def interpret(classes: list[str], probs: np.ndarray, regressed: float = float("nan")) -> dict:
    """One image's calibrated probabilities (and regressed confluence fraction) → ``predicted_class``,
    ``band`` and ``confluence_pct``. Band and confluence are None unless the classes are the four
    confluence bands; the confluence % always lies inside the predicted band."""
    p = np.asarray(probs, np.float64)
    c = int(np.argmax(p))
    bands = list(classes) == list(BAND_NAMES)
    pct = None
    if bands:
        reg = None if regressed is None or np.isnan(regressed) else np.array([regressed])
        pct = float(metrics.confluence_in_band(p[None], reg)[0])
    return {
        "predicted_class": classes[c],
        "band": BAND_LABELS.get(classes[c]) if bands else None,
        "confluence_pct": pct,
    }
