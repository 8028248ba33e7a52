"""The SSLTM model (paper §3, Fig. 2-3, Eq. 1-10, §4.1.2)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .backbone import SWIN_S, build_trunk
from .heads import SegHead, cross_entropy, present_classes
from .neck import FPNNeck, fuse_levels, resize
from .ocrnet import DECODERS, OCR_SHORT_TERM, OCRNetHead, build_ocr_short_term, stride8_levels
from .rfce import CategoryAttention, GlobalCategoryContext, ObjectContext
from .short_term import NUM_LEVELS, ShortTermModule, build_short_term, resolve_short_term

CONTEXTS = ("reference", "query")
FlowProvider = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (src, dst) (N, 3, H, W) -> (N, 2, H, W)
MIN_SIZE = 32  # the smallest input side: the trunk's total stride (the stride-32 level is then at least 1x1)


class SSLTM(nn.Module):
    """Simultaneously Short- and Long-Term Temporal Modelling for video semantic segmentation.

    ``model(frames, reference=None, labels=None)`` with ``frames (B, 1+n, 3, H, W)`` (the query frame first,
    then its ``n = num_adjacent`` adjacent frames, ImageNet-normalised), ``reference (B, 3, H, W)`` (a distant
    frame of the same video) and integer ``labels (B, H, W)`` of the query frame returns a dict:
    ``"logits"`` ``(B, num_classes, H, W)`` at input resolution, and with labels ``"losses"``, keyed by
    ``model.loss_terms``: ``"sup"``, ``"mse"``, ``"aux"``, the short-term module's own terms (already weighted)
    and ``"total" = sup + alpha * mse + beta * aux`` (Eq. 10) plus those terms, every term skipping
    ``ignore_index`` pixels. Any ``H, W >= 32``. A module that reads optical flow (``needs_flow``) takes it as
    ``flow (B, n, 2, H, W)`` float32 (query -> each adjacent frame), or computes it with the flow provider
    attached by :meth:`set_flow_provider`.

    Pipeline: all frames of the clip and the reference go through ``f_FE`` (torchvision ResNet or Swin-S + UperNet's
    PPM and FPN, one batch) and a per-stride projection to the STT dims; STT blocks over the stacked clip
    give the query frame's ``F_q^st`` at stride 4 (its four levels upsampled and concatenated); the shared
    OCR module turns ``F_q^st`` and the reference's features into category representations; multi-head
    attention of ``F_q^st``'s pixels over [reference categories, G] gives ``F_q^lt``;
    ``phi_seg([F_q^st, F_q^lt])`` gives the logits. GCC's ``G`` is trained by the MSE term and used in the
    attention.

    The image baseline (``use_stt``, ``use_rfce`` and ``use_gcc`` off) is VSPW's UPerNet, the paper's
    baseline: the query frame's four FPN levels are upsampled, concatenated (4 x 256 channels) and fused by
    ``phi_seg`` (3x3 conv + BN + ReLU, then the classifier), UperNet's ``conv_last``. SSLTM reuses UperNet's
    trunk, PPM and FPN and replaces its fusion by STT, RFCE, GCC and ``phi_seg`` over ``[F_q^st, F_q^lt]``.
    Parameters (torchvision's 7x7 stem; VSPW's ResNet has a deep stem, 123,776 parameters more):
    baseline 60,759,228 (ResNet-101, 124 classes; paper 60.9M) and 41,740,115 (ResNet-50, 19 classes; paper
    41.9M); SSLTM 62,000,841 (paper 62.1M) and 42,874,103 (paper 43.1M), i.e. 1.24M and 1.13M on top of
    the baseline (paper: 1.2M at both scales). ``parameter_breakdown()`` gives the counts per component.

    Args (the paper's settings, or UperNet's where SSLTM builds on it):
        num_classes: K (VSPW 124, Cityscapes 19).
        backbone: ``"resnet18"``, ``"resnet50"``, ``"resnet101"`` or ``"swin_s"`` (torchvision's classes;
            :func:`~ssltm.model.backbone.build_trunk`).
        fpn_dim: FPN channels (256, the paper's).
        stt_dims: channels of the four STT blocks, strides 4, 8, 16, 32 (32, 64, 128, 256).
        window_size: 3D W-MSA window ``(t, h, w)`` (4, 7, 7).
        num_adjacent: n, adjacent frames per clip (3).
        num_clusters: T, centres per class in G (3).
        alpha, beta: weights of the MSE and auxiliary terms in Eq. 10 (1.0; beta None: 0.5, or OCRNet's 0.4
            with ``decoder="ocrnet"``).
        ignore_index: label value without a class (255).
        use_stt, use_rfce, use_gcc: the ablation switches of Table 4. Without STT the query frame's four FPN
            levels, upsampled and concatenated, take the place of ``F_q^st`` (all three off: UperNet). GCC
            needs RFCE (its G is attended to there). ``use_stt`` (None: unset) is the older form of
            ``short_term``: True is ``"stt"``, False ``"none"``.
        context: ``"reference"`` (RFCE) or ``"query"`` (QFCE, supplementary §2.6: the query frame's own
            categories replace the reference's; no reference frame needed).
        pretrained: local path to a torchvision ImageNet checkpoint of the backbone (loaded as is).

    The decoder (keyword-only; README "OCRNet decoder"):
        decoder: ``"upernet"`` (UperNet's PPM + FPN, then the SSLTM heads above; the default) or ``"ocrnet"``
            (:class:`~ssltm.model.ocrnet.OCRNetHead`, openseg's SpatialOCRNet, on C4/C5 at stride 8: the ResNet
            dilated, ``replace_stride_with_dilation=[False, True, True]``; a trunk striding to 32 has C4/C5
            resized bilinearly). It needs ``use_rfce=False`` and ``use_gcc=False``, and ``short_term`` one of
            ``"none"`` (OCRNet), ``"st_ocr"`` (TCB: the regions of all clip frames averaged; ``short_term_args``
            ``memory``) or ``"netwarp"`` (NetWarp-OCR: the adjacent frame's OCR output warped and combined;
            ``flowcnn``, ``c5``) (:mod:`ssltm.model.ocrnet`). ``encode`` then gives each frame's ``[C4, C5]``
            ``(N, C_i, h, w)`` at stride 8, the logits are at stride 8 before the resize, the loss terms are
            ``"sup"``, ``"aux"`` (the aux head on C4) and ``"total" = sup + beta * aux`` (0.4) plus the module's.
            Parameters at 124 classes: 57,969,464 with ResNet-101 (paper 58.1M), 55,460,546 with Swin-S (55.5M).
        ocr_channels, ocr_key_channels, ocr_dropout: OCRNet's widths and Dropout2d (512, 256, 0.05).

    The short-term module (keyword-only; README "Short-term modules"):
        short_term: one of ``SHORT_TERM`` (:mod:`ssltm.model.short_term`): ``"stt"`` (the default unless
            ``use_stt=False``), ``"none"`` (the query frame's fused feature), ``"netwarp"``, ``"st_ocr"``. The
            module is the submodule of that name (``model.stt``, ...; ``model.short_term_module``), and the
            heads take its ``out_channels``. Any module but ``"none"`` makes ``forward`` encode every clip frame.
        short_term_args: further arguments of the module's constructor (``build_short_term``); STT's come
            from the ``stt_*``, ``head_dim``, ``window_size``, ``mlp_ratio`` and ``shifted_windows`` arguments.

    UperNet's settings (VSPW's UPerNet, keyword-only):
        ppm_dim: width of each PPM branch (512).
        pool_scales: PPM bins (1, 2, 3, 6).
        head_channels: hidden width of ``phi_seg`` (256, UperNet's fusion conv; 3x3).

    Choices where the paper is silent (keyword-only; the defaults put SSLTM about 1.2M parameters above the
    baseline at both scales, as in the paper, and its total within 1% of the paper's 62.1M and 43.1M):
        stt_depths: STT units per stride (1 each: the paper's Fig. 3 shows one base unit per block).
        head_dim: head width of the W-MSA and of the category attention (32; not given in the paper).
        mlp_ratio: Mix-FFN hidden width / dim (4, SegFormer's).
        shifted_windows: shift the windows of every second unit (Video Swin). Off: the paper's unit connects
            windows through the Mix-FFN's depthwise conv instead (supplementary §1), and with 4 frames and a
            temporal window of 4 only a spatial shift would remain.
        context_dim: D, the width of the category representations, G and ``F_q^lt`` (256, FPN's width;
            OCRNet's 512 would add 1.9M).
        aux_channels: hidden width of ``phi_aux`` (256).
        aux_kernel_size: kernel of ``phi_aux``'s conv (1, as OCRNet's HRNet aux head).
        ocr_kernel_size: kernel of the OCR's pixel conv to D channels (1; OCRNet's is 3x3, 1.0M more).
        dropout: dropout before the 1x1 classifiers (0.1, mmsegmentation's default; no parameters).
        reference_stt: how the reference frame's features reach the shared OCR. Off (default, Eq. 3:
            ``F_ref = f_FE(I_ref)``): its projected FPN levels are fused exactly as the query's STT outputs
            are, without STT units. On: it also passes the STT blocks as a one-frame clip.
        backbone_depths: Swin-S's blocks per stage (None: its 2-2-18-2); fewer make a reduced Swin-S with the
            same modules and widths (the smoke test's; :class:`~ssltm.model.backbone.SwinTrunk`).

    Memory (keyword-only):
        checkpointing: in training, the backbone's stem and stages and the STT blocks recompute their
            activations in the backward instead of keeping them (``torch.utils.checkpoint``, non-reentrant):
            less memory for about one more forward of those parts; the same losses, gradients and batch-norm
            statistics. Evaluation and inference are unchanged.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        fpn_dim: int = 256,
        stt_dims: Sequence[int] = (32, 64, 128, 256),
        window_size: Sequence[int] = (4, 7, 7),
        num_adjacent: int = 3,
        num_clusters: int = 3,
        alpha: float = 1.0,
        beta: float | None = None,
        ignore_index: int = 255,
        use_stt: bool | None = None,
        use_rfce: bool = True,
        use_gcc: bool = True,
        context: str = "reference",
        pretrained: str | os.PathLike | None = None,
        *,
        decoder: str = "upernet",
        ocr_channels: int = 512,
        ocr_key_channels: int = 256,
        ocr_dropout: float = 0.05,
        short_term: str | None = None,
        short_term_args: dict[str, Any] | None = None,
        ppm_dim: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        head_channels: int = 256,
        stt_depths: Sequence[int] = (1, 1, 1, 1),
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        shifted_windows: bool = False,
        context_dim: int = 256,
        aux_channels: int = 256,
        aux_kernel_size: int = 1,
        ocr_kernel_size: int = 1,
        dropout: float = 0.1,
        reference_stt: bool = False,
        backbone_depths: Sequence[int] | None = None,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_adjacent < 0:
            raise ValueError(f"num_adjacent must be >= 0, got {num_adjacent}")
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        if use_gcc and not use_rfce:
            raise ValueError("use_gcc=True needs use_rfce=True: G is attended to in the RFCE attention")
        if len(stt_dims) != 4 or len(tuple(window_size)) != 3:
            raise ValueError(
                f"stt_dims needs 4 entries (strides 4..32) and window_size 3 (t, h, w), got "
                f"{tuple(stt_dims)} and {tuple(window_size)}"
            )
        for name, value in (("head_channels", head_channels), ("aux_channels", aux_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("aux_kernel_size", aux_kernel_size), ("ocr_kernel_size", ocr_kernel_size)):
            if not isinstance(value, int) or value < 1 or value % 2 == 0:
                raise ValueError(f"{name} must be a positive odd integer (a size-preserving conv), got {value!r}")
        self.short_term = resolve_short_term(short_term, use_stt)
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        ocrnet = decoder == "ocrnet"
        if ocrnet and (use_rfce or use_gcc):
            raise ValueError(
                f"decoder='ocrnet' has no RFCE or GCC: it needs use_rfce=False and use_gcc=False, got "
                f"use_rfce={use_rfce}, use_gcc={use_gcc}"
            )
        if ocrnet and self.short_term not in OCR_SHORT_TERM:
            raise ValueError(f"decoder='ocrnet' takes short_term one of {OCR_SHORT_TERM}, got {self.short_term!r}")
        self.decoder = decoder
        self.num_classes, self.num_adjacent, self.ignore_index = num_classes, num_adjacent, ignore_index
        self.alpha, self.beta = alpha, (0.4 if ocrnet else 0.5) if beta is None else beta
        self.use_stt, self.use_rfce, self.use_gcc = self.short_term == "stt", use_rfce, use_gcc
        self.context, self.reference_stt = context, reference_stt
        self.flow_provider: FlowProvider | None = None  # a plain attribute: outside the state_dict

        # ocrnet: a ResNet dilated to stride 8 (Swin's C4/C5 are resized to stride 8 by stride8_levels)
        self.backbone = build_trunk(
            backbone, pretrained, checkpointing, dilated=ocrnet and backbone != SWIN_S, depths=backbone_depths
        )
        if ocrnet:
            c4_channels, c5_channels = self.backbone.channels[2:]
            self.decode_head = OCRNetHead(
                c4_channels, c5_channels, num_classes, ocr_channels, ocr_key_channels, ocr_dropout
            )
            module = build_ocr_short_term(self.short_term, ocr_channels, c5_channels, **(short_term_args or {}))
            self.add_module(self.short_term, module)
            self.loss_terms: tuple[str, ...] = ("sup", "aux", *module.loss_terms, "total")
            self._reference_through_module = False
            return
        self.neck = FPNNeck(self.backbone.channels, fpn_dim, pool_scales, ppm_dim)
        args = dict(short_term_args or {})
        if self.short_term == "stt":
            stt = dict(
                dims=stt_dims,
                depths=stt_depths,
                head_dim=head_dim,
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                shifted_windows=shifted_windows,
                checkpointing=checkpointing,
            )
            args = {**stt, **args}
        self.add_module(self.short_term, build_short_term(self.short_term, fpn_dim, num_classes, **args))
        module = self.short_term_module
        st_channels = module.out_channels
        # RFCE's reference frame: its fused (STT: projected) levels where they have the module's width (Eq. 3),
        # else the module's feature of the reference alone, a one-frame clip
        fused_width = st_channels if self.short_term == "stt" else NUM_LEVELS * fpn_dim
        self._reference_through_module = use_rfce and fused_width != st_channels
        if self._reference_through_module and (module.needs_images or module.needs_flow):
            raise ValueError(
                f"use_rfce=True would pass the reference frame alone through short_term {self.short_term!r} "
                f"({st_channels} channels, the fused levels {fused_width}), which reads images or flow"
            )
        self.loss_terms = ("sup", "mse", "aux", *module.loss_terms, "total")
        if use_rfce:
            self.ocr = ObjectContext(
                st_channels, num_classes, context_dim, aux_channels, dropout, aux_kernel_size, ocr_kernel_size
            )
            self.attention = CategoryAttention(st_channels, context_dim, head_dim)
            if use_gcc:
                self.gcc = GlobalCategoryContext(num_clusters, num_classes, context_dim)
        self.seg_head = SegHead(st_channels + (context_dim if use_rfce else 0), head_channels, num_classes, dropout)

    @property
    def short_term_module(self) -> ShortTermModule:
        """The short-term module (the submodule named ``self.short_term``)."""
        return getattr(self, self.short_term)

    def set_flow_provider(self, provider: FlowProvider | None) -> None:
        """Attach the optical flow provider (e.g. ``ssltm.flow.make_flow_provider``) that computes the flow a
        ``needs_flow`` module reads when ``forward`` is given none (and for :class:`VideoPredictor`): a plain
        attribute, never part of the ``state_dict`` or the parameters, even if the provider is a module."""
        if provider is not None and not callable(provider):
            raise TypeError(f"provider must be callable (src, dst) -> flow, got {type(provider).__name__}")
        object.__setattr__(self, "flow_provider", provider)

    def optical_flow(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """The attached provider's flow from ``src`` to ``dst`` (normalised ``(N, 3, H, W)``): float32
        ``(N, 2, H, W)``, without gradients."""
        if self.flow_provider is None:
            raise ValueError(
                f"short_term {self.short_term!r} needs flow: pass flow (B, n, 2, H, W) or attach a flow "
                "provider with set_flow_provider (config key model.flow)"
            )
        with torch.no_grad(), torch.autocast(src.device.type, enabled=False):  # float32 flow
            flow = self.flow_provider(src, dst)
        _check_flow(flow, (src.shape[0], 2, *src.shape[-2:]), src.device, "the flow provider's output", "(N, 2, H, W)")
        return flow

    @property
    def uses_reference(self) -> bool:
        """Whether the forward needs a reference frame (RFCE with ``context="reference"``)."""
        return self.use_rfce and self.context == "reference"

    # ------------------------------------------------------------------------------------ stages
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``f_FE`` and the short-term module's per-frame projection (STT's per-stride projection), per image:
        ``(N, 3, H, W)`` -> ``[(N, h_i, w_i, d_i)]`` at strides 4, 8, 16, 32 (what a streaming predictor caches
        per frame). With ``decoder="ocrnet"``: the trunk's ``[C4, C5]``, ``(N, C_i, h, w)`` at stride 8."""
        if self.decoder == "ocrnet":
            return stride8_levels(self.backbone(images))
        return self.short_term_module.project(self.neck(self.backbone(images)))

    def reference_context(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """A reference frame's encoded levels ``[(B, h_i, w_i, d_i)]`` -> its categories ``F_ref^c (B, K, D)``."""
        if not self.use_rfce:
            raise RuntimeError("reference_context needs use_rfce=True")
        if self.reference_stt and self.short_term == "stt":
            levels = self.stt([x[:, None] for x in levels])
        if self._reference_through_module:
            return self.ocr(self.short_term_module.query_feature([x[:, None] for x in levels]))[1]
        return self.ocr(fuse_levels(levels))[1]

    def decode(
        self,
        clip: Sequence[torch.Tensor],
        reference_categories: torch.Tensor | None = None,
        size: Sequence[int] | None = None,
        images: torch.Tensor | None = None,
        flow: torch.Tensor | None = None,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Encoded clip levels ``[(B, 1+n, h_i, w_i, d_i)]`` (query first; the query alone will do for a module
        with ``uses_adjacent`` False; with ``decoder="ocrnet"`` ``[C4, C5]`` as ``(B, 1+n, C_i, h, w)``) and
        ``F_ref^c`` -> logits ``(B, K, H, W)`` resized to ``size`` (the decoder's stride, 4 or 8, when None).
        ``images (B, 1+n, 3, H, W)``: the clip's frames, for a module that ``needs_images``;
        ``flow (B, n, 2, H, W)`` float32: query -> adjacent, for one that ``needs_flow``; ``state``: the
        per-video dict of a module with a memory (kept by :class:`VideoPredictor`)."""
        logits = self._heads(self._short_term(clip, images, flow, state), reference_categories)[0]
        return logits if size is None else resize(logits, size)

    def _short_term(self, clip, images=None, flow=None, state=None):
        """``F_q^st (B, out_channels, H/4, W/4)``, the module's inputs checked first; with ``decoder="ocrnet"``
        the query's OCR output ``(B, ocr_channels, H/8, W/8)`` and its aux logits (:class:`OCRShortTerm`)."""
        module = self.short_term_module
        if module.needs_images or module.needs_flow:  # the flow is checked against the frames' size
            b, t = clip[0].shape[:2]
            expected = f"the clip's frames (B, T, 3, H, W) = ({b}, {t}, 3, H, W)"
            if images is None:
                raise ValueError(f"short_term {self.short_term!r} needs images: {expected}")
            if (
                not isinstance(images, torch.Tensor)
                or images.dim() != 5
                or tuple(images.shape[:3]) != (b, t, 3)
                or not images.is_floating_point()
            ):
                got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else images
                raise ValueError(f"images must be float, {expected}, got {got}")
            if module.needs_flow:
                _check_flow(flow, (b, t - 1, 2, *images.shape[-2:]), images.device)
        if self.decoder == "ocrnet":
            return module(self.decode_head, clip, images, flow, state)
        return module.query_feature(clip, images, flow, state)

    def _heads(self, st, reference_categories: torch.Tensor | None):
        """``F_q^st`` -> (seg logits, aux logits | None, query categories | None, ``phi_seg``'s pre-classifier
        map), all at stride 4 (ocrnet: the OCR output and aux logits -> the classifier's logits, those aux logits,
        None and the OCR output, at stride 8)."""
        if self.decoder == "ocrnet":
            features, aux_logits = st
            return self.decode_head.classify(features), aux_logits, None, features
        aux_logits = categories = None
        if self.use_rfce:
            aux_logits, categories = self.ocr(st)
            context = categories if self.context == "query" else reference_categories
            if context is None:
                raise ValueError("RFCE with context='reference' needs the reference frame's categories")
            if self.use_gcc:
                g = self.gcc.context().to(context.dtype)
                context = torch.cat([context, g.expand(context.shape[0], *g.shape)], dim=1)
            long_term = self.attention(st, context)  # F_q^lt
            st = torch.cat([st, long_term.to(st.dtype)], dim=1)
        features = self.seg_head.features(st)
        return self.seg_head.classify(features), aux_logits, categories, features

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        frames: torch.Tensor,
        reference: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        flow: torch.Tensor | None = None,
        *,
        all_frames: bool = False,
        return_features: bool = False,
    ) -> dict:
        """See the class docstring. ``all_frames`` (a per-frame model: a short-term module that reads the query
        frame only) segments every frame of the clip as a query in one batched pass and adds ``"frame_logits"``
        ``(B, T, K, H, W)`` (frame 0 is ``"logits"``; the losses are the query's). ``return_features`` adds
        ``"features"``, ``phi_seg``'s map before its classifier ``(B, head_channels, H/4, W/4)`` (the conv + BN +
        ReLU), and with ``all_frames`` also ``"frame_features"`` ``(B, T, head_channels, H/4, W/4)``. With
        ``decoder="ocrnet"`` the features are the OCR output before the classifier's dropout, ``(B, ocr_channels,
        H/8, W/8)``, and ``all_frames`` takes ``short_term="none"`` (OCRNet per frame; ETC-OCR)."""
        b, t, _, h, w = self._check_inputs(frames, reference, labels)
        module = self.short_term_module
        if all_frames and module.uses_adjacent:
            raise ValueError(
                f"all_frames=True segments each frame on its own: short_term {self.short_term!r} reads the "
                "adjacent frames (use a per-frame model, short_term 'none')"
            )
        if module.needs_flow and flow is not None:
            _check_flow(flow, (b, t - 1, 2, h, w), frames.device)
        # the baseline looks at the query only, or at each frame on its own (all_frames)
        clip_frames = frames if module.uses_adjacent or all_frames else frames[:, :1]
        if module.needs_flow and flow is None:
            query = frames[:, :1].expand(-1, t - 1, -1, -1, -1)
            flow = self.optical_flow(query.flatten(0, 1), frames[:, 1:].flatten(0, 1)).unflatten(0, (b, t - 1))
        images = clip_frames.flatten(0, 1)
        if self.uses_reference:
            images = torch.cat([images, reference], dim=0)
        levels = self.encode(images)
        n = clip_frames.shape[0] * clip_frames.shape[1]
        reference_categories = self.reference_context([x[n:] for x in levels]) if self.uses_reference else None
        if all_frames:  # every frame a one-frame clip of its own, with its video's reference
            per_frame = clip_frames.shape[1]
            if reference_categories is not None:
                reference_categories = reference_categories.repeat_interleave(per_frame, dim=0)
            seg_logits, aux_logits, categories, features = self._segment_levels(
                [x[:n] for x in levels], reference_categories
            )
        else:
            per_frame = 1
            clip = [x[:n].unflatten(0, (b, -1)) for x in levels]
            st = self._short_term(clip, frames if module.needs_images or module.needs_flow else None, flow)
            seg_logits, aux_logits, categories, features = self._heads(st, reference_categories)
        frame_logits = resize(seg_logits, (h, w)).unflatten(0, (b, per_frame))
        out = {"logits": frame_logits[:, 0]}
        if all_frames:
            out["frame_logits"] = frame_logits
        if return_features:
            out["features"] = features.unflatten(0, (b, per_frame))[:, 0]
            if all_frames:
                out["frame_features"] = features.unflatten(0, (b, per_frame))
        if labels is not None:
            if all_frames:  # the query's
                aux_logits = None if aux_logits is None else aux_logits[::per_frame]
                categories = None if categories is None else categories[::per_frame]
            out["losses"] = self._losses(out["logits"], aux_logits, categories, labels.long())
        return out

    def segment_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A per-frame model (short-term module that reads the query only, no reference frame) on single images:
        ``(N, 3, H, W)`` -> logits ``(N, K, H/4, W/4)`` (before the resize to the input size) and ``phi_seg``'s
        pre-classifier map ``(N, head_channels, H/4, W/4)``, every image a one-frame clip of its own in one
        batched pass (the path of :meth:`forward`'s ``all_frames``)."""
        if self.short_term_module.uses_adjacent or self.uses_reference:
            reads = (
                f"short_term {self.short_term!r} reads adjacent frames"
                if self.short_term_module.uses_adjacent
                else "use_rfce=True with context='reference' reads a reference frame"
            )
            raise ValueError(f"segment_images segments each image on its own, but {reads} (use a per-frame model)")
        if (
            not isinstance(images, torch.Tensor)
            or images.dim() != 4
            or images.shape[1] != 3
            or images.shape[0] == 0
            or not images.is_floating_point()
        ):
            got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else images
            raise ValueError(f"images must be a float tensor (N, 3, H, W), got {got}")
        if min(images.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got shape {tuple(images.shape)}")
        logits, _, _, features = self._segment_levels(self.encode(images))
        return logits, features

    def _segment_levels(self, levels: Sequence[torch.Tensor], reference_categories: torch.Tensor | None = None):
        """Encoded images ``[(N, h_i, w_i, d_i)]``, each a one-frame clip -> :meth:`_heads`' outputs."""
        return self._heads(self._short_term([x[:, None] for x in levels]), reference_categories)

    def _losses(
        self,
        logits: torch.Tensor,
        aux_logits: torch.Tensor | None,
        categories: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        ignore = self.ignore_index
        sup = cross_entropy(logits, labels, ignore)
        zero = sup.new_zeros(())
        aux = zero if aux_logits is None else cross_entropy(resize(aux_logits, labels.shape[-2:]), labels, ignore)
        mse = self.gcc.loss(categories, present_classes(labels, self.num_classes, ignore)) if self.use_gcc else zero
        module = self.short_term_module.losses(labels)
        if tuple(module) != self.short_term_module.loss_terms:
            raise RuntimeError(
                f"short_term {self.short_term!r} returned loss terms {tuple(module)}, "
                f"not its loss_terms {self.short_term_module.loss_terms}"
            )
        total = sup + self.alpha * mse + self.beta * aux
        for term in module.values():
            total = total + term
        terms = {"sup": sup, "mse": mse, "aux": aux, **module, "total": total}
        return {name: terms[name] for name in self.loss_terms}  # ocrnet: no "mse"

    @torch.no_grad()
    def predict(self, frames: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Class map ``(B, H, W)`` int64 of the query frames, in eval mode (the mode is restored after)."""
        was_training = self.training
        self.eval()
        try:
            return self(frames, reference)["logits"].argmax(1)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------ validation
    def _check_inputs(self, frames, reference, labels) -> tuple[int, int, int, int, int]:
        t = 1 + self.num_adjacent
        expected = f"(B, {t}, 3, H, W) (the query frame, then {self.num_adjacent} adjacent frames)"
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames must be a tensor {expected}, got {type(frames).__name__}")
        if frames.dim() != 5 or frames.shape[1] != t or frames.shape[2] != 3 or frames.shape[0] == 0:
            raise ValueError(f"frames must be {expected}, got shape {tuple(frames.shape)}")
        if not frames.is_floating_point():
            raise TypeError(f"frames must be a floating-point tensor, got {frames.dtype}")
        b, _, _, h, w = frames.shape
        if h < MIN_SIZE or w < MIN_SIZE:
            raise ValueError(f"frames must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got shape {tuple(frames.shape)}")
        if reference is not None:
            _check_tensor("reference", reference, (b, 3, h, w), frames)
            if reference.dtype != frames.dtype:
                raise TypeError(f"reference must have the frames' dtype {frames.dtype}, got {reference.dtype}")
        elif self.uses_reference:
            raise ValueError(
                f"reference (B, 3, H, W) = {(b, 3, h, w)} is required with use_rfce=True and context='reference'"
            )
        if labels is not None:
            _check_tensor("labels", labels, (b, h, w), frames)
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        return b, t, 3, h, w

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameter count per component (``"total"`` included)."""
        parts = {"backbone": self.backbone}
        if self.decoder == "ocrnet":
            head = self.decode_head
            parts.update(
                {
                    "ocr aux head (C4)": head.aux_head,
                    "ocr pixel conv (C5)": head.pixels,
                    "object attention": head.attention,
                    "ocr fuse": head.fuse,
                    "classifier": head.classifier,
                    f"short-term module ({self.short_term})": self.short_term_module,
                }
            )
            return _counts(parts, self)
        parts["neck (PPM + FPN)"] = self.neck
        if self.short_term == "stt":
            parts.update({"stt projections": self.stt.proj, "stt blocks": self.stt.blocks})
        else:
            parts[f"short-term module ({self.short_term})"] = self.short_term_module
        if self.use_rfce:
            parts.update(
                {
                    "ocr aux head (phi_aux)": self.ocr.aux_head,
                    "ocr pixel conv": self.ocr.pixels,
                    "category attention": self.attention,
                }
            )
            if self.use_gcc:
                parts["gcc (G)"] = self.gcc
        parts["seg head (phi_seg)"] = self.seg_head
        return _counts(parts, self)


def _counts(parts: dict[str, nn.Module], model: nn.Module) -> dict[str, int]:
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def _check_flow(
    flow, shape: tuple[int, ...], device: torch.device, name: str = "flow", layout: str = "(B, n, 2, H, W)"
) -> None:
    """A ValueError naming ``name`` and the expected shape unless ``flow`` is float32 of ``shape`` on ``device``."""
    if (
        not isinstance(flow, torch.Tensor)
        or tuple(flow.shape) != shape
        or flow.dtype != torch.float32
        or flow.device != device
    ):
        got = f"{tuple(flow.shape)} {flow.dtype} on {flow.device}" if isinstance(flow, torch.Tensor) else flow
        raise ValueError(f"{name} must be float32 {layout} = {shape} on {device} (query -> adjacent frames), got {got}")


def _check_tensor(name: str, x, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {shape}, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} to match frames {tuple(like.shape)}, got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but frames are on {like.device}")
