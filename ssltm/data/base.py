"""The clip dataset every loader in :mod:`ssltm.data` builds on: sampling, decoding, transform, seeding."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .sampling import ClipSampler
from .transforms import IGNORE_INDEX, eval_transform, photometric_distortion

Transform = Callable[[dict[str, Any]], dict[str, Any]]

# data.mode: every labelled frame of a training video is a query, or only its first ("sf", VSPW-SF; the datasets
# that read the mode: VSPW and the synthetic videos).
MODES = ("full", "sf")
# Splits scored with the paper's inference: their clips default to the farthest frame as the reference.
EVAL_SPLITS = ("val", "test")


def default_reference(split: str, reference: str | None) -> str:
    """``reference`` if given, else the paper's protocol for ``split``: ``"farthest"`` on the evaluation
    splits (``"val"``, ``"test"``), ``"random"`` on any other (training) split."""
    if reference is not None:
        return reference
    return "farthest" if split in EVAL_SPLITS else "random"


class ClipDataset(Dataset):
    """A ``Dataset`` of clips; subclasses say what the videos are.

    A sample is a dict:

    - ``"frames"``: float32 ``(1+n, 3, H, W)``, ImageNet-normalised, the query first, then the
      adjacent frames nearest first (``n = len(offsets)``);
    - ``"reference"``: float32 ``(3, H, W)``;
    - ``"label"``: int64 ``(H, W)``, class ids, 255 = ignore;
    - ``"video"``: str, the video's name; ``"frame"``: str, the query frame's id;
    - ``"labeled"``: bool, True (False for the unlabelled clips of :class:`~ssltm.data.UnlabeledClips`);
    - ``"reference_strong"``, with ``strong_reference=True``: float32 ``(3, H, W)``, the reference with
      :func:`~ssltm.data.transforms.photometric_distortion` (colour only: the geometry of ``"reference"``);
    - ``"frames_strong"``, with ``strong_frames=True``: float32 ``(1+n, 3, H, W)``, the frames with the distortion
      of ``"reference_strong"`` (one draw for the whole clip, reference included);
    - ``"flow"``, with :attr:`flow_provider` set: float32 ``(n, 2, H, W)``, the optical flow from the query
      to each adjacent frame, computed on the transformed frames (pixels, x then y; see :mod:`ssltm.flow`).

    Class metadata (mmsegmentation's ``METAINFO``): ``METAINFO = {"classes": (names...), "palette": ((r, g, b),
    ...)}`` on the class, the palette optional (default: :func:`ssltm.visualize.make_palette`); a dataset whose
    names come from its files or the run's config overrides :meth:`metainfo` instead. :meth:`from_config` builds
    the dataset of one split from a run's config.

    ``torch.utils.data.default_collate`` stacks a batch to ``frames (B, 1+n, 3, H, W)``,
    ``reference (B, 3, H, W)``, ``label (B, H, W)`` and lists of str (equal ``H, W`` needed: a crop
    in training, batch size 1 for full frames of varying size).

    Args:
        offsets, causal, reference: the :class:`ClipSampler` settings.
        transform: called on ``{"frames": tv_tensors.Video (1+n, 3, H, W) uint8, "reference":
            tv_tensors.Image (3, H, W) uint8, "label": tv_tensors.Mask (H, W) uint8}``; must return
            the same keys with the float / int64 tensors above. Default: :func:`eval_transform`.
        seed: None draws the random reference and augmentation from torch's global RNG (the
            DataLoader seeds each worker from it, so ``torch.manual_seed`` makes a run
            repeatable for a fixed ``num_workers``). An int makes sample ``i`` a function of
            ``(seed, epoch, i)`` alone, whatever the order or worker; :meth:`set_epoch` varies it.
        strong_reference: samples also carry ``"reference_strong"``. Its distortion is drawn from a generator
            of the sample's own (seeded from ``(seed, epoch, i)`` like the rest), applied to the decoded uint8
            reference before ``transform``, which then gives it the reference's scale, crop and flip (the colour
            steps are per pixel: they commute with crop and flip, and nearly with the scaling's interpolation).
        strong_frames: samples also carry ``"frames_strong"`` and ``"reference_strong"``: one such distortion of
            all the frames and the reference (Mean Teacher's student input).
    """

    num_classes: int
    METAINFO: ClassVar[dict[str, Sequence]] = {}
    # A model-side flow provider of ssltm.flow (e.g. DisFlowProvider()): set, samples carry "flow".
    flow_provider: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # The colour distortion of the strong views: uint8 RGB (..., H, W, 3) and a torch.Generator in, uint8 out.
    photometric: Callable[[np.ndarray, torch.Generator], np.ndarray] = staticmethod(photometric_distortion)

    @classmethod
    def unlabeled_frames(cls, cfg: Any) -> bool | None:
        """Whether the training split of the run config ``cfg`` has frames that are no labelled query (the
        queries of :class:`~ssltm.data.UnlabeledClips`), told from the config alone: None when only the files
        can tell (the default). Config checks refuse False; :attr:`has_unlabeled_frames` tells for a built
        dataset."""
        return None

    @classmethod
    def metainfo(cls, cfg: Any) -> dict[str, Sequence]:
        """``{"classes": names, "palette": RGB triples (optional)}`` of this dataset for the run config ``cfg``
        (``ssltm.config``'s schema); by default :attr:`METAINFO`."""
        return cls.METAINFO

    @classmethod
    def from_config(cls, cfg: Any, split: str, labels: bool = True, **common: Any) -> ClipDataset:
        """The dataset of ``split`` for the run config ``cfg``: by default
        ``cls(cfg.data.root, split, seed=cfg.train.seed, **common)``, the constructor of
        :class:`SplitClipDataset` (``common``: ``offsets``, ``reference``, ``transform``, and
        ``strong_reference`` / ``strong_frames`` when asked for), with ``labels=False``
        added when asked for a split to predict without labels (every frame a query, none read as a label).

        Raises:
            ValueError: ``data.root`` is not set, or the constructor does not take these arguments.
        """
        args = (config_root(cfg), split)
        kwargs = {"seed": cfg.train.seed, **common, **({} if labels else {"labels": False})}
        try:
            inspect.signature(cls).bind(*args, **kwargs)
        except TypeError as err:
            raise ValueError(
                f"data.dataset {cfg.data.dataset!r}: the constructor of {cls.__name__} does not take "
                f"({', '.join(['root', 'split', *kwargs])}): {err}"
            ) from None
        return cls(*args, **kwargs)

    def __init__(
        self,
        offsets: Sequence[int] = (3, 6, 9),
        causal: bool = False,
        reference: str = "random",
        transform: Transform | None = None,
        seed: int | None = None,
        strong_reference: bool = False,
        strong_frames: bool = False,
    ):
        self.sampler = ClipSampler(tuple(offsets), causal, reference)
        self.strong_reference, self.strong_frames = bool(strong_reference), bool(strong_frames)
        self.transform = eval_transform() if transform is None else transform
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self.epoch = 0
        # (video index, query frame index) per sample; filled by the subclass.
        self.queries: list[tuple[int, int]] = []

    # What a subclass provides.
    def video_name(self, video: int) -> str:
        raise NotImplementedError

    def video_length(self, video: int) -> int:
        raise NotImplementedError

    def frame_id(self, video: int, index: int) -> str:
        raise NotImplementedError

    def read_frame(self, video: int, index: int) -> np.ndarray:
        """RGB uint8 ``(H, W, 3)``."""
        raise NotImplementedError

    def read_label(self, video: int, index: int) -> np.ndarray:
        """Class ids uint8 ``(H, W)``, 255 = ignore."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """With an int ``seed``, draw a new reference and augmentation for every sample of this epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} is outside a dataset of {len(self)} clips")
        video, query = self.queries[i]
        return self.clip(video, query, self.epoch, (i % len(self),))

    def clip(self, video: int, query: int, epoch: int, key: tuple[int, ...], labeled: bool = True) -> dict[str, Any]:
        """The sample of frame ``query`` of ``video``; with an int ``seed``, its random draws are a function of
        ``(seed, epoch, *key)`` alone. ``labeled=False`` reads no label: it is all 255 (ignore)."""
        if self.seed is None:
            return self._load(video, query, labeled, None)
        # Word 0 seeds the transforms (as it always has), word 1 the strong view's distortion.
        words = np.random.SeedSequence([self.seed, epoch, *key]).generate_state(2)
        # Only the CPU generator: v2 transforms draw from it, and the caller's CUDA RNG stays untouched.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(words[0]))
            return self._load(video, query, labeled, int(words[1]))

    @property
    def has_unlabeled_frames(self) -> bool:
        """Whether some frame of the videos with samples (every video, for a dataset of files) is no query."""
        return bool(self.unlabeled_queries())

    def unlabeled_queries(self) -> list[tuple[int, int]]:
        """``(video, frame)`` of every frame that is not a (labelled) query, video by video, in temporal order:
        the frames of the videos :meth:`split_videos` names."""
        queried = set(self.queries)
        return [(v, t) for v in self.split_videos() for t in range(self.video_length(v)) if (v, t) not in queried]

    def split_videos(self) -> list[int]:
        """The videos of this split: by default those with a query (a dataset of files: every video it lists)."""
        return sorted({v for v, _ in self.queries})

    def _load(self, video: int, query: int, labeled: bool, strong_seed: int | None) -> dict[str, Any]:
        length = self.video_length(video)
        indices = (query, *self.sampler.adjacent(query, length))
        reference = self.sampler.reference_index(query, length)
        # The label first, then the query's frame: a generated dataset renders both in one pass.
        label = self.read_label(video, query) if labeled else None
        frames = [self.read_frame(video, t) for t in indices]
        ref = self.read_frame(video, reference)
        if label is None:
            label = np.full(frames[0].shape[:2], IGNORE_INDEX, dtype=np.uint8)
        shapes = {a.shape[:2] for a in (*frames, ref, label)}
        if len(shapes) != 1:
            raise ValueError(
                f"video {self.video_name(video)!r}: frames {indices}, reference {reference} and the label "
                f"differ in size {sorted(shapes)}; a clip needs one size"
            )
        # Channels-first copies of the uint8 decode: element-wise float ops on a channels-last view
        # are several times slower, and the transforms keep the input's layout.
        clip = {
            "frames": tv_tensors.Video(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()),
            "reference": tv_tensors.Image(torch.from_numpy(ref).permute(2, 0, 1).contiguous()),
            "label": tv_tensors.Mask(torch.from_numpy(label)),
        }
        if self.strong_reference or self.strong_frames:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(2**62, ())) if strong_seed is None else strong_seed)
            # One draw: the frames (strong_frames) and the reference, stacked, get the same distortion.
            strong = self.photometric(np.stack([*frames, ref]) if self.strong_frames else ref, generator)
            if self.strong_frames:
                clip["frames_strong"] = tv_tensors.Video(torch.from_numpy(strong[:-1]).permute(0, 3, 1, 2).contiguous())
                strong = strong[-1]
            clip["reference_strong"] = tv_tensors.Image(torch.from_numpy(strong).permute(2, 0, 1).contiguous())
        out = self.transform(clip)
        sample = {
            "frames": out["frames"].as_subclass(torch.Tensor),
            "reference": out["reference"].as_subclass(torch.Tensor),
            "label": out["label"].as_subclass(torch.Tensor),
            "video": self.video_name(video),
            "frame": self.frame_id(video, query),
            "labeled": labeled,
        }
        for key in ("frames_strong", "reference_strong"):
            if key in clip:
                if key not in out:
                    raise KeyError(f"the transform dropped {key!r} (it must return every key it is given)")
                sample[key] = out[key].as_subclass(torch.Tensor)
        if self.flow_provider is not None:
            frames = sample["frames"]
            sample["flow"] = self.flow_provider(frames[:1].expand(len(frames) - 1, -1, -1, -1), frames[1:])
        return sample


@dataclass(frozen=True)
class VideoFiles:
    """One video on disk: its frames in temporal order and the labels it has (by frame index)."""

    name: str
    frame_ids: tuple[str, ...]
    images: tuple[Path, ...]
    labels: dict[int, Path]


class FileClipDataset(ClipDataset):
    """A clip dataset read from image files; subclasses fill ``self.videos``, ``self.queries`` and
    set ``label_lut``, a uint8 ``(256,)`` table from raw label values to class ids / 255."""

    label_lut: np.ndarray

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.videos: list[VideoFiles] = []

    def video_name(self, video: int) -> str:
        return self.videos[video].name

    def split_videos(self) -> list[int]:
        return list(range(len(self.videos)))

    def video_length(self, video: int) -> int:
        return len(self.videos[video].images)

    def frame_id(self, video: int, index: int) -> str:
        return self.videos[video].frame_ids[index]

    def read_frame(self, video: int, index: int) -> np.ndarray:
        return read_rgb(self.videos[video].images[index])

    def read_label(self, video: int, index: int) -> np.ndarray:
        path = self.videos[video].labels[index]
        return self.label_lut[read_label_png(path)]


class SplitClipDataset(FileClipDataset):
    """A file clip dataset of one split of a release stored under ``root``: the constructor the
    released datasets share. It keeps ``self.root`` (a ``Path``) and ``self.split``, then calls
    :meth:`_scan`, which subclasses write to fill ``self.videos`` and ``self.queries``.

    Args:
        root: the release's folder.
        split: the split's name.
        reference: as in :class:`ClipDataset`; by default :func:`default_reference` of ``split``.
        offsets, causal, transform, seed, strong_reference, strong_frames: see :class:`ClipDataset`.
        labels: ``False`` lists every frame of every video as a query and reads no labels (a split to
            predict, e.g. a test split shipped without them); ``_scan`` reads it as ``self.labels``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        offsets: Sequence[int] = (3, 6, 9),
        causal: bool = False,
        reference: str | None = None,
        transform: Transform | None = None,
        seed: int | None = None,
        labels: bool = True,
        strong_reference: bool = False,
        strong_frames: bool = False,
    ):
        super().__init__(
            offsets=offsets,
            causal=causal,
            reference=default_reference(split, reference),
            transform=transform,
            seed=seed,
            strong_reference=strong_reference,
            strong_frames=strong_frames,
        )
        self.root, self.split, self.labels = Path(root), split, labels
        self._scan()

    def _scan(self) -> None:
        """Fill ``self.videos`` and ``self.queries`` from the files of ``self.split`` under ``self.root``."""
        raise NotImplementedError


def read_rgb(path: Path) -> np.ndarray:
    """The image at ``path`` as RGB uint8 ``(H, W, 3)`` (OpenCV: faster JPEG decoding than Pillow)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read image {path} (missing, or not an image OpenCV can decode)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_label_png(path: Path) -> np.ndarray:
    """The raw label values of a single-channel or palette PNG as uint8 ``(H, W)``.

    Pillow, because OpenCV expands palette PNGs (VSPW's masks) to colours instead of their indices.
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise ValueError(f"label {path} has mode {img.mode!r}; expected a one-channel (L) or palette (P) PNG")
            return np.asarray(img, dtype=np.uint8)
    except OSError as e:
        raise OSError(f"cannot read label {path}: {e}") from e


def natural_order(name: str) -> tuple:
    """The sort key that puts ``f_2`` before ``f_10``: runs of digits compare as numbers, the text between them
    case-insensitively."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name))


def config_root(cfg: Any) -> Path:
    """``cfg.data.root`` as a ``Path``; a ValueError naming the key when it is not set."""
    if not cfg.data.root:
        raise ValueError(f"data.root must name the folder of the {cfg.data.dataset} data")
    return Path(cfg.data.root)


_VIDEO_NAME = re.compile(r"[^\s/\\]+")


def read_split_file(path: Path, what: str) -> list[str]:
    """The video names in a split file, one a line, blank lines skipped; errors call the file ``what``."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: expected {path}")
    names: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if not _VIDEO_NAME.fullmatch(name):
            raise ValueError(f"{path}, line {number}: expected one video name (no spaces or slashes), got {line!r}")
        names.append(name)
    if not names:
        raise ValueError(f"{what} {path} lists no videos")
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{what} {path} lists videos more than once: {repeated[:5]}")
    return names


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a FileNotFoundError saying what was expected there."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: expected a folder at {path}")
    return path


def index_lut(mapping: dict[int, int]) -> np.ndarray:
    """A uint8 ``(256,)`` lookup table that maps the given raw values and sends every other value to 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut
